"""tuning package."""

__all__: list[str] = []
