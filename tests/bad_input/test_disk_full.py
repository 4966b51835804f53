"""A disk that fills up mid-write: one line naming the output, nothing of it left behind.

The full disk is real: a 256 KiB tmpfs mounted for the command alone in a private mount namespace
(``unshare``), so the test needs neither root on the host nor a mount that outlives it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, cli_argv

TMPFS_KIB = 256


def _namespace_prefix() -> list[str]:
    """``unshare`` arguments that give a command its own mount namespace (as root, or as a user namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: cannot make a small full disk")
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("this machine allows no private mount namespace (unshare -m / -rm): cannot make a full disk")


def _on_a_full_disk(
    args: list[str], mount: Path, cwd: Path, free_kib: int | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``dedn ARGS`` with a fresh TMPFS_KIB tmpfs on ``mount`` (with ``free_kib``, a file ``filler``
    first leaves only that much free); returns the result and what is on that disk afterwards (listed
    inside the namespace, before the mount disappears with it)."""
    mount.mkdir(parents=True, exist_ok=True)
    disk = shlex.quote(str(mount))
    fill = "" if free_kib is None else f"head -c {(TMPFS_KIB - free_kib) * 1024} /dev/zero > {disk}/filler\n"
    script = (
        f"mount -t tmpfs -o size={TMPFS_KIB}k tmpfs {disk} || exit 97\n{fill}"
        f"{shlex.join(cli_argv(*args))}\nrc=$?\necho '--- left:' >&2\nls -A {disk} >&2\nexit $rc\n"
    )
    proc = subprocess.run(
        [*_namespace_prefix(), "sh", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 97, proc.stderr
    err, _, left = proc.stderr.rpartition("--- left:\n")
    proc.stderr = err
    return proc, left.split()


def _one_line(proc: subprocess.CompletedProcess[str], out: Path) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {out}: --out: could not be written: No space left on device (ENOSPC)")
    return lines[0]


def test_synth_store_on_a_full_disk(tmp_path: Path) -> None:
    out = tmp_path / "disk" / "store"
    # the built-in store is about 600 KiB: the disk fills while its image table is being written
    proc, left = _on_a_full_disk(["data", "synth", "--builtin", "--out", str(out)], out.parent, tmp_path)
    _one_line(proc, out)
    assert left == []  # not the store, not its temporary folder


def test_train_checkpoint_on_a_full_disk(tmp_path: Path, tiny_store: Path) -> None:
    out = tmp_path / "disk" / "ckpt"
    args = ["train", "-c", str(TINY_CONFIG), "--store", str(tiny_store), "--out", str(out)]
    args += ["--set", "optim.epochs=1", "--set", "device=cpu", "--no-progress"]
    proc, left = _on_a_full_disk(args, out.parent, tmp_path, free_kib=8)  # the weights do not fit in 8 KiB
    _one_line(proc, out)
    assert left == ["filler"]  # only what was there before
