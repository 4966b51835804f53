"""Where a search's Optuna study lives, as a URL: ``sqlite:///PATH`` (the default), ``postgresql://...`` (shared
by many searches; password in ``~/.pgpass``, ``PGPASSWORD`` or the URL) or ``journal:PATH`` (an append-only file,
for NFS, where SQLite's locking is unreliable). File paths are recorded absolute, so ``--resume`` works anywhere."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
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
        return url.removeprefix(_SQLITE).split("?", 1)[0]
    return url.removeprefix(_JOURNAL) if url.startswith(_JOURNAL) else None


def storage_rule(url: str) -> str | None:
    """None when ``url`` has one of the ``FORMS``; else the rule it breaks. Nothing is opened."""
    path = _file_path(url)
    if path is None:
        return postgres_rule(url) if is_postgres(url) else f"must be {FORMS}"
    if path == ":memory:":
        return "must name a file: an in-memory study is lost with the driver (and --resume needs it)"
    if path == "":
        return f"must name a file: give {FORMS}"
    return "must not contain a NUL byte" if "\0" in path else None


def checked_storage(url: str | None, experiment: Path, field: str, new_search: bool, study: str) -> str:
    """The storage URL a search uses (``None``: the default in ``experiment``), file paths made absolute.
    Raises DednInputError (URL, ``field``, rule) for a malformed URL, a file in a missing folder, an unreachable
    PostgreSQL database, and for a ``new_search`` a storage already holding ``study`` (another search's)."""
    if url is None:
        return default_storage(experiment)
    if (rule := storage_rule(url)) is not None:
        raise DednInputError(url, field, rule)
    path = _file_path(url)
    if path is not None:
        absolute = Path(path).expanduser().resolve()
        # the storage path and the experiment folder are made by the search itself
        if not absolute.parent.is_dir() and absolute.parent not in (experiment, experiment.parent):
            raise DednInputError(url, field, f"folder {absolute.parent} does not exist")
        prefix = _SQLITE if url.startswith(_SQLITE) else _JOURNAL
        url = f"{prefix}{absolute}{url[len(prefix) + len(path) :]}"  # a SQLite URL's ?query kept
        exists = absolute.is_file()
    else:
        exists = "studies" in database_tables(url, "optuna storage")
    if new_search and exists:
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
    """The Optuna storage ``url`` names (``RDBStorage`` or ``JournalStorage``), its tables or file created."""
    if url.startswith(_JOURNAL):
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix(_JOURNAL)))
    if is_postgres(url):  # a database that stops answering fails a call in seconds instead of hanging
        return optuna.storages.RDBStorage(
            normalized(url), engine_kwargs={"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        )
    return optuna.storages.RDBStorage(url)


def open_buffered(url: str) -> tuple[Any, Callable[[], None]]:
    """(storage, flush) for the one process writing a study: a journal is buffered, other storages write at once."""
    if not url.startswith(_JOURNAL):
        return open_storage(url), lambda: None
    backend = BufferedJournal(url.removeprefix(_JOURNAL))
    return optuna.storages.JournalStorage(backend), backend.flush


class BufferedJournal(BaseJournalBackend):
    """A ``JournalFileBackend`` keeping appends in memory until ``flush``, ``max_logs`` kept or the oldest ``max_age_s``
    old (one lock, write and disk sync for many calls). For the study's one writer: ``flush`` raises when another
    process appended meanwhile."""

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
