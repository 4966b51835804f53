"""Signatures of the files ``--resume`` hands to Ray Tune, and the Tune callback that keeps them current.

Tune restores a search by unpickling ``tuner.pkl``, ``searcher-state-*.pkl``, ``experiment_state-*.json`` and
``search_gen_state-*.json`` (embedded cloudpickle) and the trials' ``*.pkl``: whoever can replace one in the experiment
folder (shared storage) would run code in the next ``dedn search --resume``. So the search signs them (HMAC-SHA256)
with a key kept in the user's config folder (``key_path``, 0600), and a resume refuses the folder unless each matches
a signature in ``resume.sig``. ``tuner.pkl`` is signed after Tune writes it, the rest in Tune's staging folder before
Tune copies them over (``resume_signer``); the last few digests per file are kept, so a lagging copy still verifies.
Tune's copy writes each file in place, so a driver killed mid-copy leaves torn files in the experiment folder;
``repair_torn_copies`` finishes that copy from the staging folder ``resume.sig`` names before a resume verifies.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dedn.errors import DednInputError

__all__ = ["StateSigner", "repair_torn_copies", "resume_signer", "signing_key", "verify_state"]

# Not *.json: on --resume Tune copies *.json and *.pkl to its staging folder and back, which would restore an old one.
SIGNATURE_FILE = "resume.sig"
KEY_FILE = "resume.key"
_FORMAT = 1
_KEEP = 16  # digests kept per file
_DOMAIN = b"dedn-resume-state-v1\0"
_log = logging.getLogger(__name__)


def key_path() -> Path:
    """``$XDG_CONFIG_HOME/dedn/resume.key``, by default in ``~/.config``."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "dedn" / KEY_FILE


def signing_key() -> bytes:
    """The user's signing key, made first (random, 0600, in a 0700 folder) when there is none."""
    path = key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):  # another search made it first: use that one
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    key = resume_key()
    assert key is not None
    return key


def resume_key() -> bytes | None:
    """The user's signing key, or None when there is none (this creates nothing)."""
    path = key_path()
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        raise DednInputError(path, "permissions", "the resume key must be readable by you alone (chmod 600)")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < 32:
        raise DednInputError(path, "key", "not a dedn resume key (64 hex digits)")
    return key


def state_files(root: Path) -> list[Path]:
    """The files under ``root`` Tune may unpickle on restore: ``*.pkl`` at any depth, top-level ``*state-*.json``."""
    if not root.is_dir():
        return []
    return sorted({p for p in [*root.rglob("*.pkl"), *root.glob("*state-*.json")] if p.is_file()})


def _digest(key: bytes, rel: str, path: Path) -> str:
    mac = hmac.new(key, _DOMAIN + rel.encode() + b"\0", hashlib.sha256)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def _read_signatures(exp: Path) -> dict[str, list[str]] | None:
    """The signature file's digests by relative path; None when missing or malformed."""
    return _files(_read_signature_file(exp))


def _files(record: dict[str, Any]) -> dict[str, list[str]] | None:
    files = record.get("files")
    if not isinstance(files, dict):
        return None
    return {str(k): [str(d) for d in v] for k, v in files.items() if isinstance(v, list)}


def _read_signature_file(exp: Path) -> dict[str, Any]:
    try:
        data = json.loads((exp / SIGNATURE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == _FORMAT else {}


class StateSigner:
    """Signs state files into ``<exp>/resume.sig``; hashes a file again only when it changed."""

    def __init__(self, exp: Path, key: bytes) -> None:
        self.exp, self.key = Path(exp), key
        self._seen: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) when last signed
        self._staging: str | None = None

    def sign(self, root: Path, files: Iterable[Path] | None = None, staging: bool = False) -> None:
        """Sign ``files`` (default: all state files) by their path relative to ``root`` (the folder or Tune's copy);
        ``staging``: ``root`` is the staging folder Tune copies from, named in ``resume.sig`` for ``repair_torn_copies``."""
        root = Path(root)
        named = staging and self._staging != str(root)  # a new staging folder to record
        if named:
            self._staging = str(root)
        new: dict[str, str] = {}
        for p in state_files(root) if files is None else files:
            rel = p.relative_to(root).as_posix()
            try:
                st = p.stat()
                if self._seen.get(rel) == (st.st_size, st.st_mtime_ns):
                    continue
                digest = _digest(self.key, rel, p)
            except OSError:  # removed meanwhile (Tune replaces its files atomically)
                continue
            self._seen[rel] = (st.st_size, st.st_mtime_ns)
            new[rel] = digest
        if not new and not named:
            return
        record = _read_signature_file(self.exp)
        signed = _files(record) or {}
        fresh = {rel: digest for rel, digest in new.items() if digest not in signed.get(rel, [])}
        for rel, digest in fresh.items():
            signed[rel] = [*signed.get(rel, []), digest][-_KEEP:]
        if fresh or named:
            record = {"format": _FORMAT, "files": signed, "staging": self._staging or record.get("staging")}
            tmp = self.exp / f".{SIGNATURE_FILE}.tmp"
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.exp / SIGNATURE_FILE)


def repair_torn_copies(exp: Path) -> list[str]:
    """Finish the copy a killed driver left torn, from its staging folder (named in ``resume.sig``): a state file whose
    copy here is unsigned is replaced by a signed staging copy; a trial's ``result.json`` or ``params.json`` (Tune's
    logger files, nothing else: the folder named could be anyone's) whose copy here is a strict prefix of the staging
    copy is completed. Symbolic links are never followed; each copy is written to a new file, then renamed. Returns the
    paths repaired, relative to ``exp``; a missing staging folder (another machine, a reboot) repairs nothing, and
    ``verify_state`` then refuses a torn state file."""
    exp = Path(exp)
    record = _read_signature_file(exp)
    signed, staging, key = _files(record) or {}, record.get("staging"), resume_key()
    if not isinstance(staging, str) or key is None or not (root := Path(staging)).is_dir() or root.is_symlink():
        return []
    state = set(state_files(exp))
    logs = {p for name in ("result.json", "params.json") for p in exp.glob(f"*/{name}")}
    repaired = []
    for here in sorted(state | logs):
        rel = here.relative_to(exp).as_posix()
        src = root / rel
        if here.is_symlink() or any(p.is_symlink() for p in (src, *src.parents[: rel.count("/")])) or not src.is_file():
            continue
        if here in state:
            torn = _digest(key, rel, here) not in signed.get(rel, []) and _digest(key, rel, src) in signed.get(rel, [])
        else:
            have, whole = here.read_bytes(), src.read_bytes()
            torn = len(have) < len(whole) and whole.startswith(have)
        if torn:
            fd, tmp = tempfile.mkstemp(prefix=f".{here.name}.", suffix=".repair", dir=here.parent)  # a new file
            with os.fdopen(fd, "wb") as out, src.open("rb") as f:
                shutil.copyfileobj(f, out)
            os.replace(tmp, here)
            repaired.append(rel)
    return repaired


def verify_state(exp: Path) -> None:
    """DednInputError (field ``signature``) unless every state file of ``exp`` is signed with the user's key. Reads
    only; creates nothing, not even the key."""
    exp = Path(exp)
    sig = exp / SIGNATURE_FILE
    if not sig.is_file():
        raise DednInputError(sig, "signature", "missing: the folder's Ray state is unsigned, refusing to unpickle it")
    if (signatures := _read_signatures(exp)) is None:
        raise DednInputError(sig, "signature", "not a dedn signature file, refusing to unpickle the state")
    if (key := resume_key()) is None:
        why = "no resume key: cannot verify the folder's Ray state, refusing to unpickle it"
        raise DednInputError(key_path(), "signature", why)
    for p in state_files(exp):
        rel = p.relative_to(exp).as_posix()
        if _digest(key, rel, p) not in signatures.get(rel, []):
            why = "does not match: changed since this search wrote it (or not written by it), refusing to unpickle it"
            raise DednInputError(p, "signature", why)


def resume_signer(exp: str) -> Any:
    """The Tune callback signing what ``--resume`` unpickles (module level: tuner.pkl refers to it by name)."""
    return _signer_class()(exp)


@functools.cache
def _signer_class() -> type:
    """``ResumeSigner``, built on first use so that importing this module needs no Ray."""
    from ray.tune import Callback

    class ResumeSigner(Callback):
        """Signs in ``get_state``, which Tune calls in its save after writing to its staging folder and before copying
        it over; and at step ends (every 2 s at most) and the end, for params.pkl or error.pkl written in between."""

        def __init__(self, exp: str) -> None:
            self.exp = exp
            self._trials: list[Any] | None = None
            self._signer: StateSigner | None = None
            self._last = 0.0

        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (resume_signer, (self.exp,))

        def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._trials = trials  # Tune's own list: holds the trials its next save writes

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._trials = trials
            if time.monotonic() - self._last >= 2.0:
                self._sign()

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            self._trials = trials
            self._sign()

        def get_state(self) -> dict[str, Any] | None:
            self._sign()
            return None  # nothing of ours to save: Tune then writes no callback-state pickle

        def _sign(self) -> None:
            self._last = time.monotonic()
            if not self._trials:
                return
            storage = self._trials[0].storage
            try:
                exp = Path(storage.experiment_fs_path)
                exp = exp if exp.is_dir() else Path(self.exp)
                if self._signer is None or self._signer.exp != exp:
                    self._signer = StateSigner(exp, signing_key())
                if (staging := _staging_folder(Path(storage.experiment_driver_staging_path))) is not None:
                    self._signer.sign(staging, staging=True)
            except Exception as e:  # never fail the search over it: a later --resume is refused instead
                _log.warning("could not sign the search state for --resume: %s: %s", type(e).__name__, e)

    return ResumeSigner


def _staging_folder(named: Path) -> Path | None:
    """This session's ``<Ray session>/artifacts/<time>/<name>/driver_artifacts``: the newest sibling, as trials
    restored by ``--resume`` keep the ``<time>`` of the session that made them."""
    try:
        found = [p for p in named.parents[2].glob(f"*/{named.parent.name}/{named.name}") if p.is_dir()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    except (OSError, IndexError):
        return None
