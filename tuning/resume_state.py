"""Keyed digests of the files ``--resume`` hands to Ray Tune, which unpickles them, and the Tune callback that keeps
them current while a search runs.

Ray Tune restores a search by unpickling ``tuner.pkl``, the searcher state (``searcher-state-*.pkl``), its
experiment and search-generator state (``experiment_state-*.json``, ``search_gen_state-*.json``, JSON with
embedded cloudpickle, or a pickle under a .json name) and the trials' ``*.pkl`` files. Whoever can replace
one of them in the experiment folder (shared storage) would run code in the next ``dedn search --resume``.
So the search signs each of these files with HMAC-SHA256 under a key that never leaves the user's config
folder (``$XDG_CONFIG_HOME/dedn/resume.key``, default ``~/.config/dedn``, created 0600), and a resume
refuses the folder unless every such file matches a signature in ``resume.sig``.

The search writes the signatures itself: ``tuner.pkl`` right after Tune writes it (when the Tuner is built), the
other files from Tune's driver staging folder inside Tune's own save (``resume_signer``), before Tune copies them
into the experiment folder. The last few digests of every file are kept, so a copy that lags behind still verifies.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dedn.errors import DednInputError

__all__ = [
    "KEY_FILE",
    "SIGNATURE_FILE",
    "StateSigner",
    "key_path",
    "resume_key",
    "resume_signer",
    "signing_key",
    "state_files",
    "verify_state",
]

# Not *.json: on --resume Tune copies the experiment folder's *.json and *.pkl into its staging folder and
# from then on copies them back over the experiment folder, which would put back an old signature file.
SIGNATURE_FILE = "resume.sig"
KEY_FILE = "resume.key"
_FORMAT = 1
_KEEP = 16  # digests kept per file
_DOMAIN = b"dedn-resume-state-v1\0"


def key_path() -> Path:
    """``$XDG_CONFIG_HOME/dedn/resume.key`` (``~/.config/dedn/resume.key`` without XDG_CONFIG_HOME)."""
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
    """The files under ``root`` that Ray Tune may unpickle on restore: every ``*.pkl`` at any depth and
    the top-level ``*state-*.json`` (experiment and search-generator state)."""
    if not root.is_dir():
        return []
    found = {p for p in root.rglob("*.pkl") if p.is_file()}
    found |= {p for p in root.glob("*state-*.json") if p.is_file()}
    return sorted(found)


def _digest(key: bytes, rel: str, path: Path) -> str:
    mac = hmac.new(key, _DOMAIN + rel.encode() + b"\0", hashlib.sha256)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def _read_signatures(exp: Path) -> dict[str, list[str]] | None:
    """The signature file's digests by relative path; None when missing or malformed."""
    path = exp / SIGNATURE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    if not isinstance(files, dict):
        return None
    return {str(k): [str(d) for d in v] for k, v in files.items() if isinstance(v, list)}


class StateSigner:
    """Signs state files into ``<exp>/resume.sig``; hashes a file again only when it changed."""

    def __init__(self, exp: Path, key: bytes) -> None:
        self.exp, self.key = Path(exp), key
        self._seen: dict[str, tuple[int, int, str]] = {}  # rel -> (size, mtime_ns, digest)

    def sign(self, root: Path, files: Iterable[Path] | None = None) -> None:
        """Sign ``files`` (default: every state file) under ``root``, recorded by their path relative to
        ``root``, which is the experiment folder itself or Tune's staging copy of it."""
        root = Path(root)
        new: dict[str, str] = {}
        for p in state_files(root) if files is None else files:
            rel = p.relative_to(root).as_posix()
            try:
                st = p.stat()
                seen = self._seen.get(rel)
                if seen is not None and seen[:2] == (st.st_size, st.st_mtime_ns):
                    continue
                digest = _digest(self.key, rel, p)
            except OSError:  # removed meanwhile (Tune replaces its files atomically)
                continue
            self._seen[rel] = (st.st_size, st.st_mtime_ns, digest)
            new[rel] = digest
        if new:
            self._record(new)

    def _record(self, new: dict[str, str]) -> None:
        files = _read_signatures(self.exp) or {}
        changed = False
        for rel, digest in new.items():
            kept = files.get(rel, [])
            if digest not in kept:
                files[rel] = [*kept, digest][-_KEEP:]
                changed = True
        if changed:
            tmp = self.exp / f".{SIGNATURE_FILE}.tmp"
            tmp.write_text(json.dumps({"format": _FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.exp / SIGNATURE_FILE)


def verify_state(exp: Path) -> None:
    """Refuse (one line naming the file, field ``signature``) an experiment folder whose state files are
    not all signed with the user's key. Reads only; creates nothing (not even the key)."""
    exp = Path(exp)
    sig_file = exp / SIGNATURE_FILE
    if not sig_file.is_file():
        raise DednInputError(
            sig_file, "signature", "missing: the folder's Ray state is unsigned, refusing to unpickle it"
        )
    signatures = _read_signatures(exp)
    if signatures is None:
        raise DednInputError(sig_file, "signature", "not a dedn signature file, refusing to unpickle the state")
    key = resume_key()
    if key is None:
        raise DednInputError(
            key_path(), "signature", "no resume key: cannot verify the folder's Ray state, refusing to unpickle it"
        )
    for p in state_files(exp):
        rel = p.relative_to(exp).as_posix()
        if _digest(key, rel, p) not in signatures.get(rel, []):
            raise DednInputError(
                p,
                "signature",
                "does not match: changed since this search wrote it (or not written by it), refusing to unpickle it",
            )


def resume_signer(exp: str) -> Any:
    """The Tune callback that signs the state ``--resume`` will unpickle (module level: tuner.pkl, which
    holds the callbacks, names it by reference and a restored search keeps signing)."""
    return _signer_class()(exp)


@functools.cache
def _signer_class() -> type:
    """``ResumeSigner``, a ray.tune.Callback, built on first use so importing this module needs no Ray."""
    import logging

    from ray.tune import Callback

    log = logging.getLogger(__name__)

    class ResumeSigner(Callback):
        """Signs the files Tune will unpickle on restore . Tune calls ``get_state``
        inside its own save, after writing the experiment and searcher state to its driver staging folder
        and before copying that folder into the experiment folder, so each version is signed before it
        reaches the experiment folder. Step ends (at most every 2 s) and the experiment's end sign again,
        for what Tune writes between saves (a trial's params.pkl or error.pkl)."""

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
                staging = _staging_folder(Path(storage.experiment_driver_staging_path))
                if staging is not None:
                    self._signer.sign(staging)
            except Exception as e:  # never fail the search over it: a later --resume is refused instead
                log.warning("could not sign the search state for --resume: %s: %s", type(e).__name__, e)

    return ResumeSigner


def _staging_folder(named: Path) -> Path | None:
    """This session's driver staging folder of the experiment: ``<Ray session>/artifacts/<time>/<name>/
    driver_artifacts``. Trials restored by ``--resume`` keep the ``<time>`` of the session that created
    them, so the folder their storage names may not exist; the newest sibling for the same experiment is
    the one this session's Tune writes."""
    try:
        found = [p for p in named.parents[2].glob(f"*/{named.parent.name}/{named.name}") if p.is_dir()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    except (OSError, IndexError):
        return None
