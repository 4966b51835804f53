"""PostgreSQL URLs of the tracking store and the Optuna study, given psycopg2 by name before MLflow, Optuna or
SQLAlchemy see them (SQLAlchemy's default driver differs between versions), a password in one (better: ``~/.pgpass``)
masked in every line printed; and ``check_existing_store``: that the store of a read-only command exists."""

from __future__ import annotations

import sqlite3
import urllib.parse
from contextlib import closing
from pathlib import Path

from dedn.errors import DednInputError

__all__ = ["FORM", "check_existing_store", "database_tables", "is_postgres", "normalized", "postgres_rule"]

FORM = "postgresql://USER@HOST[:PORT]/DATABASE"  # a password: ~/.pgpass or PGPASSWORD (or USER:PASSWORD@)
_DRIVER = "postgresql+psycopg2"


def is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://``, ``postgres://``, ``postgresql+DRIVER://``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+")


def normalized(url: str) -> str:
    """A PostgreSQL URL with the project's driver named (``postgresql+psycopg2://...``); other URLs as they are."""
    if is_postgres(url) and "+" not in url.split("://", 1)[0]:
        return f"{_DRIVER}://{url.split('://', 1)[1]}"
    return url


def postgres_rule(url: str) -> str | None:
    """None for a PostgreSQL URL naming a host (or a socket folder: ``?host=``) and a database; else the rule broken."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(normalized(url))
        port = parsed.port  # a port that is not a number fails here
    except (ArgumentError, ValueError) as e:
        return f"is not a database URL ({e}): give {FORM}"
    if not (parsed.host or parsed.query.get("host")) or not parsed.database:
        return f"must name a host (or a socket folder: ?host=/var/run/postgresql) and a database: {FORM}"
    if port is not None and not 0 < port < 65536:
        return f"port must be 1..65535, got {port}: {FORM}"
    return None


def database_tables(url: str, field: str, timeout_s: float = 5.0) -> set[str]:
    """The table names of the database at ``url``, connecting for ``timeout_s`` at most; else DednInputError."""
    if (rule := postgres_rule(url)) is not None:
        raise DednInputError(url, field, rule)
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        connect_args = {"connect_timeout": max(1, round(timeout_s))}
        engine = sqlalchemy.create_engine(normalized(url), poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect() as con:
                return set(sqlalchemy.inspect(con).get_table_names())
        finally:
            engine.dispose()
    except Exception as e:  # driver missing, refused, unknown host, wrong password, no such database, ...
        cause = getattr(e, "orig", None) or e  # the driver's own error, not SQLAlchemy's wrapper
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        if password := make_url(normalized(url)).password:
            first = first.replace(str(password), "***")
        raise DednInputError(url, field, f"cannot be reached: {type(cause).__name__}: {first}") from None


def check_existing_store(uri: str) -> None:
    """Refuse, before MLflow opens (and so creates) it, a store read-only commands cannot use: a missing SQLite file
    or file store, a SQLite file or PostgreSQL database (unreachable in seconds) without MLflow's tables."""
    hint = "promote, predict and ui read an existing tracking store and never create one (check --tracking-uri or MLFLOW_TRACKING_URI)"
    if is_postgres(uri):
        if not {"experiments", "runs", "alembic_version"} <= database_tables(uri, "--tracking-uri"):
            raise DednInputError(uri, "--tracking-uri", f"not an MLflow tracking store (no MLflow tables): {hint}")
        return
    if uri.startswith("file:") or not ("://" in uri or uri.startswith(("sqlite:", "databricks", "uc:"))):  # file store
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path) if uri.startswith("file:") else uri)
        if not path.is_dir():
            raise DednInputError(path, "--tracking-uri", f"no such MLflow file store: {hint}")
        return
    if not uri.startswith("sqlite:"):  # a server or another database
        return
    name = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    path = Path(urllib.parse.unquote(name.split("?", 1)[0]))
    if str(path) in ("", ":memory:"):
        raise DednInputError(uri, "--tracking-uri", f"an in-memory SQLite store holds nothing: {hint}")
    if not path.is_file():
        raise DednInputError(path, "--tracking-uri", f"no such SQLite file: {hint}")
    try:
        with closing(sqlite3.connect(f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise DednInputError(path, "--tracking-uri", f"not a SQLite database ({e})") from None
    if not {"experiments", "runs", "alembic_version"} <= tables:
        raise DednInputError(path, "--tracking-uri", f"not an MLflow tracking store: {hint}")
