"""tracking package."""

__all__: list[str] = []
