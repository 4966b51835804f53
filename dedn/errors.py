"""The one error type for bad user input."""

from __future__ import annotations

from os import PathLike


class DednInputError(ValueError):
    """Bad input: the message names the file, the field and the rule, on one line.

    Raised before expensive work starts where the fault can be seen up front; the CLI prints
    ``error: <message>`` and exits with status 2.
    """

    def __init__(self, source: str | PathLike[str], field: str, rule: str) -> None:
        self.source = str(source)
        self.field = field
        self.rule = rule
        super().__init__(f"{self.source}: {field}: {rule}".replace("\n", " "))


class DednInputErrors(DednInputError):
    """Several input errors found at once (config validation reports them all together)."""

    def __init__(self, source: str | PathLike[str], errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        joined = "; ".join(f"{field}: {rule}" for field, rule in errors)
        super().__init__(source, f"{len(errors)} error(s)", joined)


__all__ = ["DednInputError", "DednInputErrors"]
