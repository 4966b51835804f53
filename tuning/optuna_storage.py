"""Where a search's Optuna study lives, given as a URL.

- ``sqlite:///PATH``: a SQLite file (the default, ``sqlite:///<experiment>/optuna.db``);
- ``postgresql://USER@HOST[:PORT]/DATABASE``: a PostgreSQL database, shared by many searches (each study
  is named after its experiment; a password in ``~/.pgpass`` or ``PGPASSWORD``, or ``USER:PASSWORD@``);
- ``journal:PATH``: Optuna's ``JournalStorage`` on an append-only file (``JournalFileBackend``), for a
  file system where SQLite's locking is unreliable (NFS).

Relative paths are taken from the working folder and recorded absolute, so ``--resume`` opens the same
study from anywhere. This module imports Optuna only to open a storage (the spec checks import nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dedn.errors import DednInputError
from tracking.databases import database_tables, is_postgres, normalized, postgres_rule

__all__ = ["FORMS", "checked_storage", "default_storage", "open_buffered", "open_storage", "storage_rule"]

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
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len(_JOURNAL) :]))
    if is_postgres(url):  # a database that stops answering fails a call in seconds instead of hanging
        return optuna.storages.RDBStorage(
            normalized(url), engine_kwargs={"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        )
    return optuna.storages.RDBStorage(url)


def open_buffered(url: str) -> tuple[Any, Callable[[], None]]:
    """(storage, flush) for the one process that writes a study: a journal file's appends are kept in memory
    until ``flush`` (``tuning.study_batching.BufferedJournal``: one disk sync for many calls); other storages
    write each call at once, and their ``flush`` does nothing."""
    if not url.startswith(_JOURNAL):
        return open_storage(url), lambda: None
    import optuna

    from tuning.study_batching import BufferedJournal

    backend = BufferedJournal(url[len(_JOURNAL) :])
    return optuna.storages.JournalStorage(backend), backend.flush
