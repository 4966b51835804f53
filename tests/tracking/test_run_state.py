"""The tracker's state file is checked before a resume acts on it (tracking.run_state.check_runs_state): a resumed
search uploads the checkpoint folder each recorded end names, so a hostile file could name any folder the user can
read. Folders laid out as Tune and the tracking callback lay them out, in a temporary folder; once the store can be
asked, the run ids must be runs of the search's own experiment (check_state_runs), against a real SQLite store."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dedn.errors import DednInputError
from tests.helpers import new_store
from tracking.run_state import RUNS_FILE, check_runs_state, check_state_runs

TRIAL = "dedn_trainable_1a2b3_00000_0_2026-12-01_04-00-00"
RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Any]:
    """An experiment folder with a trial checkpoint, a member checkpoint and the trial's results, Ray's driver
    staging copy of them outside it, a secret folder elsewhere, and the state a killed driver leaves."""
    exp = tmp_path / "runs" / "search-a"
    checkpoint = exp / TRIAL / "checkpoint_000002"
    member = exp / "member_checkpoints" / "t0-m1"
    for folder in (checkpoint, member):
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"weights")
    (exp / TRIAL / "result.json").write_text('{"epoch": 1}\n')
    staging = tmp_path / "ray" / "session_1" / "artifacts" / "2026-12-01_04-00-00" / "search-a" / "driver_artifacts"
    (staging / TRIAL).mkdir(parents=True)
    (staging / TRIAL / "result.json").write_text('{"epoch": 1}\n')
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_text("PRIVATE KEY\n")
    epochs = {"file": str(staging / TRIAL / "result.json"), "member": 1, "prefixes": ["val_", "loss_"]}
    state = {
        "parent": RUN,
        "experiment_id": "1",
        "trials": {"t0": RUN, "t0-m1": RUN},
        "last_epoch": {"t0-m1": 2},
        "retries": {"t0": 1},
        "abandoned": [],
        "ends": {
            "t0": {"status": "FINISHED", "reason": None, "path": str(checkpoint), "epochs": None},
            "t0-m1": {"status": "FINISHED", "reason": None, "path": str(member), "epochs": epochs},
            "t0-m2": {"status": "FAILED", "reason": "diverged", "path": None, "epochs": {**epochs, "member": 2}},
        },
    }
    return {"exp": exp, "state": state, "secret": secret, "staging": staging, "tmp": tmp_path}


def write(exp: Path, state: Any) -> Path:
    path = exp / RUNS_FILE
    path.write_text(json.dumps(state))
    return path


def refused_field(exp: Path, state: Any) -> tuple[str, str]:
    """(field, rule) of the one-line refusal of ``state``, which must name the state file first."""
    path = write(exp, state)
    with pytest.raises(DednInputError) as e:
        check_runs_state(exp)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{path.resolve()}: ")
    return e.value.field, e.value.rule


def test_the_state_a_search_writes_is_accepted(layout: dict[str, Any]) -> None:
    exp = layout["exp"]
    check_runs_state(exp)  # no state file yet: a new search's folder
    write(exp, layout["state"])
    check_runs_state(exp)
    write(exp, {"parent": None, "trials": {}})  # before the parent run exists
    check_runs_state(exp)
    in_folder = copy.deepcopy(layout["state"])  # the results in the experiment folder itself
    in_folder["ends"]["t0-m1"]["epochs"]["file"] = str(exp / TRIAL / "result.json")
    write(exp, in_folder)
    check_runs_state(exp)


def _set(state: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``state`` with the value at ``dotted`` (keys joined by '.') replaced."""
    out = copy.deepcopy(state)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


SECRET = "SECRET"  # stands for the secret folder's path in the cases below


@pytest.mark.parametrize(
    ("dotted", "value", "field", "rule"),
    [
        ("ends.t0.path", SECRET, "ends.t0.path", "must lie inside the experiment folder"),
        ("ends.t0.path", "../../home/.ssh", "ends.t0.path", "must lie inside the experiment folder"),
        ("ends.t0.path", ".", "ends.t0.path", "must lie inside the experiment folder"),
        ("ends.t0.path", 7, "ends.t0.path", "must be a folder's path or null"),
        ("ends.t0.status", "RUNNING", "ends.t0.status", "must be one of FINISHED, FAILED, KILLED"),
        ("ends.t0.reason", ["x"], "ends.t0.reason", "must be text or null"),
        ("ends.t0-m1.epochs.file", SECRET + "/id_ed25519", "ends.t0-m1.epochs.file", "must be a trial's result.json"),
        ("ends.t0-m1.epochs.file", "/etc/passwd", "ends.t0-m1.epochs.file", "must be a trial's result.json"),
        ("ends.t0-m1.epochs.member", -1, "ends.t0-m1.epochs.member", "must be a whole number >= 0 or null"),
        ("ends.t0-m1.epochs.prefixes", [""], "ends.t0-m1.epochs.prefixes", "must be a list of metric name prefixes"),
        ("ends.t0-m1.epochs", "all", "ends.t0-m1.epochs", "must be a JSON object or null"),
        ("ends.t0-m1", [], "ends.t0-m1", "must be a JSON object"),
        ("ends", [], "ends", "must be a JSON object"),
        ("trials.t0", {"id": RUN}, "trials.t0", "must be a run id"),
        ("trials.t0", "../x", "trials.t0", "must be a run id"),
        ("last_epoch.t0-m1", "2", "last_epoch.t0-m1", "must be a whole number >= 0"),
        ("retries.t0", True, "retries.t0", "must be a whole number >= 0"),
        ("abandoned", "t0", "abandoned", "must be a list of run keys"),
        ("parent", 12, "parent", "must be a run id"),
        ("experiment_id", None, "experiment_id", "must be an experiment id"),
    ],
)
def test_a_field_in_no_form_the_tracker_writes_is_refused(
    layout: dict[str, Any], dotted: str, value: Any, field: str, rule: str
) -> None:
    if isinstance(value, str) and value.startswith(SECRET):
        value = value.replace(SECRET, str(layout["secret"]))
    got_field, got_rule = refused_field(layout["exp"], _set(layout["state"], dotted, value))
    assert got_field == field and got_rule.startswith(rule)


def test_a_state_that_is_not_a_json_object_is_refused(layout: dict[str, Any]) -> None:
    assert refused_field(layout["exp"], ["parent"])[0] == "state"
    path = layout["exp"] / RUNS_FILE
    path.write_text("{not json")
    with pytest.raises(DednInputError, match=r": state: not JSON"):
        check_runs_state(layout["exp"])


def test_links_cannot_point_an_upload_outside_the_folder(layout: dict[str, Any]) -> None:
    exp, secret, state = layout["exp"], layout["secret"], layout["state"]
    # a checkpoint folder that is a link to the secret folder
    (exp / "member_checkpoints" / "t0-m3").symlink_to(secret, target_is_directory=True)
    field, rule = refused_field(exp, _set(state, "ends.t0.path", str(exp / "member_checkpoints" / "t0-m3")))
    assert (field, rule.split(" /")[0]) == ("ends.t0.path", "must lie inside the experiment folder")
    # a genuine checkpoint folder with a link planted in it (log_artifacts would follow it)
    checkpoint = Path(state["ends"]["t0"]["path"])
    (checkpoint / "extra").symlink_to(secret / "id_ed25519")
    field, rule = refused_field(exp, state)
    assert (field, rule) == ("ends.t0.path", f"must hold no links: {checkpoint.resolve() / 'extra'} is one")
    (checkpoint / "extra").unlink()
    # a trial's result.json replaced by a link to a file elsewhere
    staged = layout["staging"] / TRIAL / "result.json"
    staged.unlink()
    staged.symlink_to(secret / "id_ed25519")
    assert refused_field(exp, state)[0] == "ends.t0-m1.epochs.file"


def test_a_staging_copy_of_another_experiment_or_trial_is_refused(layout: dict[str, Any]) -> None:
    """Ray's driver staging folder is accepted only for this experiment's name and one of its trials."""
    exp, tmp, state = layout["exp"], layout["tmp"], layout["state"]
    for experiment, trial in (("search-b", TRIAL), ("search-a", "dedn_trainable_other")):
        other = tmp / "ray" / "session_2" / "artifacts" / "t" / experiment / "driver_artifacts" / trial
        other.mkdir(parents=True)
        (other / "result.json").write_text('{"epoch": 1}\n')
        hostile = _set(state, "ends.t0-m1.epochs.file", str(other / "result.json"))
        assert refused_field(exp, hostile)[0] == "ends.t0-m1.epochs.file"


def test_a_resume_acts_only_on_runs_of_the_searchs_own_experiment(tmp_path: Path, empty_store: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=new_store(empty_store, tmp_path / "mlflow.db"))
    mine, other = client.create_experiment("search-a"), client.create_experiment("search-b")
    parent = client.create_run(mine).info.run_id
    children = [client.create_run(mine, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(4)]
    client.delete_run(children[3])  # a run deleted in the UI is still the search's
    foreign = client.create_run(other).info.run_id
    exp = tmp_path / "runs" / "search-a"
    exp.mkdir(parents=True)
    state = {"parent": parent, "experiment_id": mine, "trials": {f"t{i}": r for i, r in enumerate(children)}}
    path = write(exp, state)
    for page in (1000, 2):  # one call, and pages of 2 runs: every page is read
        check_state_runs(client, state, "search-a", exp, page=page)
    check_state_runs(client, {"parent": None, "trials": {}}, "search-a", exp)  # nothing created yet: nothing to ask

    def refused(hostile: dict[str, Any], name: str = "search-a") -> str:
        with pytest.raises(DednInputError) as e:
            check_state_runs(client, hostile, name, exp, page=2)
        assert str(e.value).startswith(f"{path}: {e.value.field}: ")
        return e.value.field

    assert refused(_set(state, "trials.t1", foreign)) == "trials.t1"
    assert refused(_set(state, "parent", foreign)) == "parent"
    assert refused(_set(state, "trials.t2", "f" * 32)) == "trials.t2"  # no such run at all
    assert refused(_set(state, "experiment_id", other)) == "experiment_id"
    assert refused(_set(state, "experiment_id", "987654")) == "experiment_id"
    assert refused(_set(state, "experiment_id", "abc")) == "experiment_id"
    assert refused(state, name="search-b") == "experiment_id"  # the folder of another search's name
    assert client.get_run(foreign).info.status == "RUNNING"  # untouched
