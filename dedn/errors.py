"""The error types the CLI turns into one line: bad user input, and an output that could not be written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

# scheme://user:PASSWORD@host... and ...?password=PASSWORD (libpq's query form) in a URL
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)


def without_password(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``postgresql://u:***@host/db``),
    for messages and console lines: a database or server URL may carry one."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class DednInputError(ValueError):
    """Bad input: the message names the file, the field and the rule, on one line.

    Raised before expensive work starts where the fault can be seen up front; the CLI prints
    ``error: <message>`` and exits with status 2.
    """

    def __init__(self, source: str | PathLike[str], field: str, rule: str) -> None:
        self.source = without_password(str(source))  # a URL's password never reaches the console
        self.field = field
        self.rule = without_password(rule)
        super().__init__(f"{self.source}: {field}: {self.rule}".replace("\n", " "))


class DednInputErrors(DednInputError):
    """Several input errors found at once (config validation reports them all together)."""

    def __init__(self, source: str | PathLike[str], errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        joined = "; ".join(f"{field}: {rule}" for field, rule in errors)
        super().__init__(source, f"{len(errors)} error(s)", joined)


class DednOutputError(RuntimeError):
    """An output could not be written (disk full, quota, read-only or unwritable folder). The message names
    the output and says nothing of it was kept; the CLI prints ``error: <message>`` and exits with status 2."""

    def __init__(self, dest: str | PathLike[str], field: str, err: OSError) -> None:
        import errno
        import os

        code = err.errno or 0
        reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else str(err)
        self.dest, self.field = str(dest), field
        super().__init__(f"{self.dest}: {field}: could not be written: {reason}; nothing of it was kept")


__all__ = ["DednInputError", "DednInputErrors", "DednOutputError", "config_named", "without_password"]


@contextmanager
def config_named(path: str | PathLike[str]) -> Iterator[None]:
    """Errors of a loaded config that say only "config" (the model and device checks see no file) name ``path``."""
    try:
        yield
    except DednInputError as e:
        if e.source != "config":
            raise
        raise DednInputError(path, e.field, e.rule) from None
