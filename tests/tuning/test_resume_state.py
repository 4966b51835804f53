"""A driver killed in the middle of Tune's copy to the experiment folder: ``--resume`` finishes that copy from the
staging folder the signatures name, and still refuses what no signature covers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dedn.errors import DednInputError
from tuning.resume_state import StateSigner, repair_torn_copies, signing_key, verify_state

ROWS = "".join(json.dumps({"epoch": e, "score": e / 10}) + "\n" for e in range(1, 7))
STAGED = {
    "experiment_state-2026.json": json.dumps({"trials": ["trial-000", "trial-001"], "pad": "x" * 500}),
    "searcher-state-2026.pkl": "searcher " * 40,
    "trial-000/params.pkl": "pickled config of trial-000",
    "trial-000/params.json": json.dumps({"beta": 0.5, "gamma": 2}),
    "trial-000/result.json": ROWS,
    "trial-001/params.pkl": "pickled config of trial-001",
    "trial-001/result.json": ROWS[:40],
}


def _search(tmp_path: Path) -> tuple[Path, Path]:
    """A staging folder signed as the running driver signs it, and the experiment folder Tune copied it to."""
    staging, exp = tmp_path / "session" / "driver_artifacts", tmp_path / "runs" / "exp"
    for rel, text in STAGED.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(text)
    exp.mkdir(parents=True)
    StateSigner(exp, signing_key()).sign(staging, staging=True)
    shutil.copytree(staging, exp, dirs_exist_ok=True)
    return staging, exp


def _tear(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_finishes_a_copy_the_killed_driver_left_torn(tmp_path: Path) -> None:
    staging, exp = _search(tmp_path)
    assert json.loads((exp / "resume.sig").read_text())["staging"] == str(staging)
    verify_state(exp)  # the whole copy verifies
    _tear(exp / "trial-000/params.pkl", 0)  # as found after a SIGKILL: opened for the copy, nothing written
    _tear(exp / "trial-000/params.json", 0)
    _tear(exp / "trial-000/result.json", len(ROWS) // 2 + 3)  # mid-row
    _tear(exp / "experiment_state-2026.json", 100)
    with pytest.raises(DednInputError, match="signature: does not match"):
        verify_state(exp)
    repaired = repair_torn_copies(exp)
    assert sorted(repaired) == sorted(
        ["experiment_state-2026.json", "trial-000/params.pkl", "trial-000/params.json", "trial-000/result.json"]
    )
    verify_state(exp)
    for rel, text in STAGED.items():
        assert (exp / rel).read_text() == text, rel
    assert not list(exp.rglob(".*.repair"))  # written aside and renamed: nothing half-written is left
    assert repair_torn_copies(exp) == []  # nothing left to finish


def test_repair_copies_only_signed_state_and_whole_prefixes(tmp_path: Path) -> None:
    staging, exp = _search(tmp_path)
    (exp / "trial-000/params.pkl").write_text("replaced by someone else")  # not a torn copy: unsigned, any length
    (exp / "trial-000/params.json").write_text('{"beta": 9}')  # not a prefix of the staging copy: left as it is
    (exp / "trial-001/result.json").write_text(ROWS[:20])  # a lagging copy: its rows are a prefix, finished
    (staging / "trial-001/params.pkl").write_text("changed after signing")  # the staging copy is unsigned
    _tear(exp / "trial-001/params.pkl", 5)
    assert repair_torn_copies(exp) == ["trial-000/params.pkl", "trial-001/result.json"]
    assert (exp / "trial-000/params.pkl").read_text() == STAGED["trial-000/params.pkl"]  # the signed bytes
    assert (exp / "trial-000/params.json").read_text() == '{"beta": 9}'
    assert (exp / "trial-001/result.json").read_text() == ROWS[:40]
    with pytest.raises(DednInputError, match="trial-001/params.pkl: signature: does not match"):
        verify_state(exp)  # an unsigned staging copy is never brought in


def test_no_staging_folder_repairs_nothing_and_resume_is_refused(tmp_path: Path) -> None:
    staging, exp = _search(tmp_path)
    _tear(exp / "trial-000/params.pkl", 0)
    shutil.rmtree(staging)  # another machine's driver, or a reboot
    assert repair_torn_copies(exp) == []
    with pytest.raises(DednInputError, match="trial-000/params.pkl: signature: does not match"):
        verify_state(exp)


def test_a_staging_folder_named_by_someone_else_gives_nothing_away(tmp_path: Path) -> None:
    """Whoever can write the experiment folder can rename the staging folder in ``resume.sig``: pointed at a folder of
    the user's own files, the repair copies nothing into the (perhaps shared) experiment folder but Tune's logger files,
    and follows no symbolic link there."""
    staging, exp = _search(tmp_path)
    secrets = tmp_path / "home" / ".ssh"
    (secrets / "trial-001").mkdir(parents=True)
    (secrets / "id_ed25519").write_text("PRIVATE KEY")
    (secrets / "trial-001" / "notes.txt").write_text("private notes")
    (secrets / "trial-000").symlink_to(secrets)  # trial-000/id_ed25519 through a link
    (secrets / "trial-001" / "result.json").symlink_to(secrets / "id_ed25519")
    for rel in ("id_ed25519", "trial-001/notes.txt", "trial-000/id_ed25519"):
        (exp / rel).write_text("")  # planted: an empty file is a prefix of anything
    (exp / "trial-001/result.json").write_text("")
    sig = json.loads((exp / "resume.sig").read_text())
    (exp / "resume.sig").write_text(json.dumps({**sig, "staging": str(secrets)}))
    assert repair_torn_copies(exp) == []
    assert [p.read_text() for p in sorted(exp.rglob("*")) if p.is_file() and "PRIVATE" in p.read_text()] == []
    assert (exp / "trial-001/notes.txt").read_text() == "" and (exp / "trial-001/result.json").read_text() == ""
