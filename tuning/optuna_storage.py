"""Where a search's Optuna study lives, given as a URL.

- ``sqlite:///PATH``: a SQLite file (the default, ``sqlite:///<experiment>/optuna.db``);
- ``postgresql://USER@HOST[:PORT]/DATABASE``: a PostgreSQL database, shared by many searches (each study
  is named after its experiment; a password in ``~/.pgpass`` or ``PGPASSWORD``, or ``USER:PASSWORD@``);
- ``journal:PATH``: Optuna's ``JournalStorage`` on an append-only file (``JournalFileBackend``), for a
  file system where SQLite's locking is unreliable (NFS).

Relative paths are taken from the working folder and recorded absolute, so ``--resume`` opens the same
study from anywhere. ``BufferedJournal`` keeps a journal's appends in memory until ``flush``, for the one process
that writes the study: many Optuna calls then cost one file lock, one write and one disk sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

from dedn.errors import DednInputError
from tracking.databases import database_tables, is_postgres, normalized, postgres_rule

__all__ = [
    "FORMS",
    "BufferedJournal",
    "checked_storage",
    "default_storage",
    "open_buffered",
    "open_storage",
    "storage_rule",
]

FORMS = "sqlite:///PATH, postgresql://USER@HOST[:PORT]/DATABASE or journal:PATH"
_SQLITE, _JOURNAL = "sqlite:///", "journal:"


def default_storage(experiment: Path) -> str:
    """The study of a search that names no storage: ``optuna.db`` in its experiment folder."""
    return f"{_SQLITE}{experiment / 'optuna.db'}"


def _file_path(url: str) -> str | None:
    """The file a ``sqlite:///`` or ``journal:`` URL names (``''`` when it names none), None for others."""
    if url.startswith(_SQLITE):
        return url[len(_SQLITE) :].split("?", 1)[0]
    if url.startswith(_JOURNAL):
        return url[len(_JOURNAL) :]
    return None


def storage_rule(url: str) -> str | None:
    """None when ``url`` has one of the storage forms (``FORMS``); else the rule it breaks. Nothing is opened."""
    path = _file_path(url)
    if path is not None:
        if path == ":memory:":
            return "must name a file: an in-memory study is lost with the driver (and --resume needs it)"
        if path == "":
            return f"must name a file: give {FORMS}"
        if "\0" in path:
            return "must not contain a NUL byte"
        return None
    if is_postgres(url):
        return postgres_rule(url)
    return f"must be {FORMS}"


def checked_storage(url: str | None, experiment: Path, field: str, new_search: bool, study: str) -> str:
    """The storage URL a search uses, checked before Ray starts: ``url`` (``None``: the default in
    ``experiment``) with a relative file path made absolute. Refused with DednInputError (the URL, password
    masked, ``field``, the rule): a malformed URL, a file whose folder does not exist, a PostgreSQL database
    that cannot be reached in a few seconds, and for a ``new_search`` a storage that already holds a study
    named ``study`` (it belongs to another search: its trials would be continued and closed by this one)."""
    if url is None:
        return default_storage(experiment)
    rule = storage_rule(url)
    if rule is not None:
        raise DednInputError(url, field, rule)
    path = _file_path(url)
    if path is not None:
        absolute = Path(path).expanduser().resolve()
        if not absolute.parent.is_dir():
            raise DednInputError(url, field, f"folder {absolute.parent} does not exist")
        if url.startswith(_SQLITE):
            _, sep, query = url.partition("?")
            url = f"{_SQLITE}{absolute}{sep}{query}"
        else:
            url = f"{_JOURNAL}{absolute}"
        exists = absolute.is_file()
    else:
        exists = "studies" in database_tables(url, "optuna storage")
    if new_search and exists:
        import optuna

        try:
            names = optuna.get_all_study_names(open_storage(url))
        except Exception as e:  # not a SQLite database, not a journal, tables of another Optuna version
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise DednInputError(url, field, f"cannot be opened: {type(e).__name__}: {first}") from None
        if study in names:
            raise DednInputError(
                url, field, f"already holds a study named {study!r}: pick another --name, or --resume that search"
            )
    return url


def open_storage(url: str) -> Any:
    """The Optuna storage ``url`` names: an ``RDBStorage`` (SQLite, PostgreSQL) or a ``JournalStorage`` on a
    file. Creates the study tables or the journal file when they are not there yet."""
    import optuna

    if url.startswith(_JOURNAL):
        return optuna.storages.JournalStorage(JournalFileBackend(url[len(_JOURNAL) :]))
    if is_postgres(url):  # a database that stops answering fails a call in seconds instead of hanging
        return optuna.storages.RDBStorage(
            normalized(url), engine_kwargs={"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        )
    return optuna.storages.RDBStorage(url)


def open_buffered(url: str) -> tuple[Any, Callable[[], None]]:
    """(storage, flush) for the one process that writes a study: a journal file's appends are kept in memory
    until ``flush`` (``BufferedJournal``: one disk sync for many calls); other storages
    write each call at once, and their ``flush`` does nothing."""
    if not url.startswith(_JOURNAL):
        return open_storage(url), lambda: None
    import optuna

    backend = BufferedJournal(url[len(_JOURNAL) :])
    return optuna.storages.JournalStorage(backend), backend.flush


class BufferedJournal(BaseJournalBackend):
    """A ``JournalFileBackend`` whose appends are kept in memory until ``flush`` (or until ``max_logs`` are kept,
    or the oldest is ``max_age_s`` old): reads see the file's logs, then the kept ones. For the one process that
    writes the study (the search's driver): another writer's logs appended meanwhile would be numbered wrongly,
    so ``flush`` raises when the file grew behind its back."""

    def __init__(self, path: str, max_logs: int = 2_000, max_age_s: float = 1.0) -> None:
        self.path, self.max_logs, self.max_age_s = path, max_logs, max_age_s
        self.file = JournalFileBackend(path)
        self.pending: list[dict[str, Any]] = []
        self.in_file: int | None = None  # logs in the file, known once it was read to its end
        self.since = 0.0  # when the oldest kept log was appended
        self.flushed = 0  # flushes that wrote something (read by tests and benchmarks)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        if not self.pending:
            n = log_number_from
            for log in self.file.read_logs(log_number_from):
                n += 1
                yield log
            self.in_file = n
            return
        assert self.in_file is not None and log_number_from >= self.in_file, "the journal was read out of order"
        yield from self.pending[log_number_from - self.in_file :]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self.in_file is None:  # Optuna reads before it writes; be safe if it ever does not
            for _ in self.read_logs(0):
                pass
        if not self.pending:
            self.since = time.monotonic()
        self.pending.extend(logs)
        if len(self.pending) >= self.max_logs or time.monotonic() - self.since >= self.max_age_s:
            self.flush()

    def flush(self) -> None:
        """Write the kept logs to the file at once (one lock, one write, one disk sync)."""
        if not self.pending:
            return
        start, logs = self.in_file, self.pending
        assert start is not None
        if any(True for _ in self.file.read_logs(start)):
            raise RuntimeError(f"{self.path}: another process wrote to the study's journal meanwhile")
        self.file.append_logs(logs)
        self.pending = []
        written = sum(1 for _ in self.file.read_logs(start))  # also where the file backend finds the new end
        self.in_file = start + written
        self.flushed += 1
        if written != len(logs):
            raise RuntimeError(f"{self.path}: another process wrote to the study's journal meanwhile")
