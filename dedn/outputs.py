"""Where a command may write: the one check every ``--out`` goes through before any work starts.

A command writes only paths it creates. ``check_output`` refuses, with one ``DednInputError`` naming the
output and its option, an output that

* is, contains or lies inside one of the command's inputs (a store folder, a config file, a model folder,
  a benchmark folder or file);
* is the current working folder or one of its ancestors, or the user's home folder or one of its ancestors;
* is a symbolic link, or sits under a path that is not a folder or not writable;
* already exists, unless ``--overwrite`` was given and it is this command's own previous output: a folder
  holding ``.dedn-output.json`` naming the command (``kind="folder"``), a folder with a valid feature-store
  ``meta.json`` (``kind="store"``), or for ``kind="file"`` a plain file (the input rules above still hold);
  a previous output folder that holds anything its writer did not write is refused too.

``write_output_folder`` builds a folder output in a temporary sibling, adds the marker, and only then moves
it into place (re-checking an existing folder it replaces at that moment).

Example:
    out = check_output(out, inputs=[config, store], command="dedn train", overwrite=overwrite, kind="folder")
    ...  # the work
    write_output_folder(out, "dedn train", lambda tmp: save_checkpoint(tmp, ...), overwrite=overwrite)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from dedn.errors import DednInputError, DednOutputError

MARKER = ".dedn-output.json"

Kind = Literal["folder", "store", "file"]


def _abs(p: str | os.PathLike[str]) -> Path:
    """The absolute path with symbolic links resolved where they exist (missing tails kept as written)."""
    return Path(os.path.abspath(Path(p).expanduser())).resolve(strict=False)


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both absolute and resolved)."""
    return inner == outer or outer in inner.parents


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's ``.dedn-output.json`` as a mapping, or None when missing or unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_store(folder: Path) -> bool:
    """A folder with a valid dedn feature-store ``meta.json``."""
    from dedn.data.schema import FORMAT_VERSION, META, StoreMeta

    try:
        meta = StoreMeta(**json.loads((folder / META).read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return bool(meta.format_version == FORMAT_VERSION)


def _foreign_entries(folder: Path, allowed: Iterable[str]) -> list[str]:
    keep = set(allowed) | {MARKER}
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _check_existing(out: Path, source: str, field: str, command: str, overwrite: bool, kind: Kind) -> None:
    """Refuse an existing ``out`` unless ``--overwrite`` was given and it is this command's own output."""
    if out.is_symlink():
        raise DednInputError(source, field, "is a symbolic link; give a real path")
    if not out.exists():
        return
    if kind == "file":
        if not out.is_file():
            raise DednInputError(source, field, "exists and is not a plain file; refusing to replace it")
        if not overwrite:
            raise DednInputError(source, field, "already exists (pass --overwrite to replace it)")
        return
    if not out.is_dir():
        raise DednInputError(source, field, "exists and is not a folder; refusing to replace it")
    if not overwrite:
        what = "a dedn feature store" if kind == "store" else f"a previous {command} output"
        raise DednInputError(source, field, f"already exists (pass --overwrite to replace {what})")
    if kind == "store":
        from dedn.data.schema import ATTRIBUTES, CLASSES, IMAGES, META

        if not _is_store(out):
            raise DednInputError(
                source, field, "exists and is not a dedn feature store (no valid meta.json); refusing to replace it"
            )
        allowed: Iterable[str] = (IMAGES, CLASSES, ATTRIBUTES, META)
    else:
        marker = read_marker(out)
        if marker is None or marker.get("command") != command:
            raise DednInputError(
                source,
                field,
                f"exists and is not a previous {command} output (no {MARKER} naming it); refusing to replace it",
            )
        files = marker.get("files")
        allowed = [str(f) for f in files] if isinstance(files, list) else []
    foreign = _foreign_entries(out, allowed)
    if foreign:
        raise DednInputError(
            source, field, f"holds files {command} did not write ({', '.join(foreign[:3])}); refusing to replace it"
        )


def _check_parent(out: Path, source: str, field: str) -> None:
    """The nearest existing ancestor of ``out`` must be a writable folder (missing ones get created)."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link
            raise DednInputError(source, field, f"parent {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise DednInputError(source, field, f"parent {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DednInputError(source, field, f"parent folder {parent} is not writable")


def check_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None],
    command: str,
    overwrite: bool,
    kind: Kind,
    field: str = "--out",
) -> Path:
    """Check ``out`` before any work (see the module docstring); returns it as an absolute path.

    ``inputs``: every path the command reads (None entries are skipped). ``command``: e.g. "dedn train",
    the name the marker of its output folders carries. Raises DednInputError(out, field, rule)."""
    source = str(out)
    given = Path(out).expanduser()
    if str(out).strip() == "":
        raise DednInputError(source, field, "must not be empty")
    target = _abs(given)
    if given.is_symlink():
        raise DednInputError(source, field, "is a symbolic link; give a real path")
    for raw in inputs:
        if raw is None or str(raw) == "":
            continue
        inp = _abs(raw)
        if target == inp:
            raise DednInputError(source, field, f"is an input of this command ({inp}); outputs never replace inputs")
        if _within(inp, target):
            raise DednInputError(source, field, f"contains an input of this command ({inp}); pick a new path")
        if _within(target, inp):
            raise DednInputError(source, field, f"lies inside an input of this command ({inp}); pick a new path")
    cwd = _abs(Path.cwd())
    if _within(cwd, target):
        raise DednInputError(source, field, "is the current folder or one of its parents; pick a new path")
    try:
        home: Path | None = _abs(Path.home())
    except (RuntimeError, KeyError):  # no home folder known
        home = None
    if home is not None and _within(home, target):
        raise DednInputError(source, field, "is the home folder or one of its parents; pick a new path")
    _check_existing(target, source, field, command, overwrite, kind)
    _check_parent(target, source, field)
    return target


def write_marker(folder: Path, command: str) -> None:
    """``.dedn-output.json`` in a freshly written output folder: the command and the files it wrote."""
    from dedn import __version__

    record = {
        "command": command,
        "dedn_version": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": sorted(p.name for p in folder.iterdir() if p.name != MARKER),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


# what the storage, not the program, is at fault for: reported as one line naming the output
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def writing(dest: str | os.PathLike[str], field: str = "--out") -> Iterator[None]:
    """Turn a storage failure while writing ``dest`` (disk full, quota, read-only, no permission) into a
    DednOutputError naming it. The writer inside must already have removed its temporary files."""
    try:
        yield
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise DednOutputError(dest, field, e) from e
        raise


def temp_sibling(dest: Path) -> Path:
    """A new temporary folder beside ``dest`` with the permissions a plain ``mkdir`` would give under the
    user's umask (``tempfile.mkdtemp`` makes it 0700, so a store or checkpoint renamed from it into a
    shared folder would be unreadable to the others there)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    return tmp


def write_output_folder(
    out: str | os.PathLike[str],
    command: str,
    build: Callable[[Path], object],
    *,
    overwrite: bool,
    field: str = "--out",
) -> Path:
    """Build an output folder with ``build(tmp)`` in a temporary sibling, add the marker, move it to ``out``.

    ``build`` must create the folder it is given. An existing ``out`` is re-checked just before it is
    replaced (it must still be this command's own previous output), then moved aside and removed."""
    dest = Path(out)
    with writing(dest, field):
        return _write_output_folder(dest, out, command, build, overwrite, field)


def _write_output_folder(
    dest: Path, out: str | os.PathLike[str], command: str, build: Callable[[Path], object], overwrite: bool, field: str
) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(dest)
    try:
        built = staging / "new"
        build(built)
        write_marker(built, command)
        if dest.exists() or dest.is_symlink():
            _check_existing(dest, str(out), field, command, overwrite, "folder")
            os.replace(dest, staging / "old")
        os.replace(built, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


__all__ = [
    "STORAGE_ERRNOS",
    "temp_sibling",
    "writing",
    "MARKER",
    "check_output",
    "read_marker",
    "write_marker",
    "write_output_folder",
]
