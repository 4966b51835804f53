"""PostgreSQL URLs, for the MLflow tracking store and the Optuna study: their one driver, the rule a URL
must follow, and a connection check that gives up after a few seconds; and the check that a tracking store a
read-only command opens exists (``check_existing_store``).

``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE`` (or ``postgres://``) is used through psycopg2, a
dependency of the project: SQLAlchemy's own default driver for a bare ``postgresql://`` differs between its
versions (psycopg2 before 2.1, psycopg 3 from 2.1 on), so the driver is named (``postgresql+psycopg2://``)
before MLflow, Optuna or SQLAlchemy see the URL. A password is better kept out of the URL (libpq reads
``~/.pgpass`` and ``PGPASSWORD``); one in it is masked in every line the project prints
(``dedn.errors.without_password``).
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

from dedn.errors import DednInputError

__all__ = ["FORM", "check_existing_store", "database_tables", "is_postgres", "normalized", "postgres_rule"]

FORM = "postgresql://USER@HOST[:PORT]/DATABASE"  # a password: ~/.pgpass or PGPASSWORD (or USER:PASSWORD@)
_DRIVER = "postgresql+psycopg2"


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://``, ``postgres://``, ``postgresql+DRIVER://``)."""
    scheme = _scheme(url)
    return scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+")


def normalized(url: str) -> str:
    """A PostgreSQL URL with the project's driver named (``postgresql+psycopg2://...``); a URL that names a
    driver already, or is no PostgreSQL URL, is returned as it is."""
    if _scheme(url) in ("postgres", "postgresql"):
        return f"{_DRIVER}://{url.split('://', 1)[1]}"
    return url


def postgres_rule(url: str) -> str | None:
    """None for a well-formed PostgreSQL URL that names a host (``HOST``, or the folder of the server's socket
    as ``?host=/var/run/postgresql``: ``postgresql://USER@/DATABASE?host=...``) and a database; else the rule
    it breaks."""
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
    """Connect to the PostgreSQL database ``url`` names (giving up after ``timeout_s``) and return its table
    names; reads nothing else, creates nothing. Raises DednInputError (the URL, password masked, ``field``,
    why) when the URL is malformed or the database cannot be reached."""
    rule = postgres_rule(url)
    if rule is not None:
        raise DednInputError(url, field, rule)
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(
            normalized(url), poolclass=NullPool, connect_args={"connect_timeout": max(1, round(timeout_s))}
        )
        try:
            with engine.connect() as con:
                return set(sqlalchemy.inspect(con).get_table_names())
        finally:
            engine.dispose()
    except Exception as e:  # driver missing, refused, unknown host, wrong password, no such database, ...
        cause = getattr(e, "orig", None) or e  # the driver's own error, not SQLAlchemy's wrapper
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        password = make_url(normalized(url)).password
        if password:
            first = first.replace(str(password), "***")
        raise DednInputError(url, field, f"cannot be reached: {type(cause).__name__}: {first}") from None


def _local_store(uri: str) -> tuple[str, Path] | None:
    """("sqlite" | "file", path) for a store on the local disk, None for a server or another database."""
    if uri.startswith("sqlite:"):
        rest = uri[len("sqlite:") :]
        path = rest[3:] if rest.startswith("///") else ""
        return "sqlite", Path(urllib.parse.unquote(path.split("?", 1)[0]))
    if uri.startswith("file:"):
        return "file", Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return "file", Path(uri)
    return None


def check_existing_store(uri: str) -> None:
    """Read-only commands (promote, predict, ui) never create a tracking store: refuse, before MLflow opens
    it (MLflow would create and initialise it), a SQLite file or a file store folder that does not exist
    and a SQLite file that is not an MLflow store; a PostgreSQL database that cannot be reached (in a few
    seconds) or holds no MLflow tables. Reads nothing but the table list, read-only."""
    hint = "promote, predict and ui read an existing tracking store and never create one (check --tracking-uri or MLFLOW_TRACKING_URI)"
    if is_postgres(uri):
        if not {"experiments", "runs", "alembic_version"} <= database_tables(uri, "--tracking-uri"):
            raise DednInputError(uri, "--tracking-uri", f"not an MLflow tracking store (no MLflow tables): {hint}")
        return
    local = _local_store(uri)
    if local is None:
        return
    kind, path = local
    if kind == "file":
        if not path.is_dir():
            raise DednInputError(path, "--tracking-uri", f"no such MLflow file store: {hint}")
        return
    if str(path) in ("", ":memory:"):
        raise DednInputError(uri, "--tracking-uri", f"an in-memory SQLite store holds nothing: {hint}")
    if not path.is_file():
        raise DednInputError(path, "--tracking-uri", f"no such SQLite file: {hint}")
    try:
        con = sqlite3.connect(f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        raise DednInputError(path, "--tracking-uri", f"not a SQLite database ({e})") from None
    if not {"experiments", "runs", "alembic_version"} <= tables:
        raise DednInputError(path, "--tracking-uri", f"not an MLflow tracking store: {hint}")
