"""The tracker's state file of an experiment folder (``mlflow_runs.state``), checked before a resume acts on it.

A resumed search makes the calls of every run end a killed driver recorded and did not write (``Tracker.start``,
``tracking.writer.end_calls``): for a FINISHED end it uploads the folder named in ``path`` to the tracking server
as the run's ``checkpoint``, and it reads the trial results named in ``epochs.file`` into ``epochs.parquet``.
Whoever can write the experiment folder (shared storage) could otherwise name any folder the user can read and
have the next ``dedn search --resume`` upload it. So a resume first checks the whole file: every field has the type
the tracker writes, every checkpoint ``path`` is a plain folder inside the experiment folder (Tune's trial
checkpoints and ``member_checkpoints/`` are), with no link in it, and every ``epochs.file`` is a trial's
``result.json``: in the experiment folder, or in Ray's driver staging folder of the same experiment and trial.
Once the tracking store can be asked, and before any run is touched, the run ids must be runs of the search's own
MLflow experiment (``check_state_runs``): a resume reopens, logs to and ends the runs the file names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dedn.errors import DednInputError

__all__ = ["END_STATUSES", "RUNS_FILE", "check_runs_state", "check_state_runs", "read_runs_state", "runs_state_file"]

# Not *.json: on --resume Tune copies the experiment folder's *.json and *.pkl into its staging folder and
# from then on copies them back over the experiment folder, which would put back this file's old version.
RUNS_FILE = "mlflow_runs.state"
_LEGACY_RUNS_FILE = "mlflow_runs.json"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")  # the MLflow run statuses a recorded end may set


def runs_state_file(folder: Path) -> Path | None:
    """The tracker's state file of an experiment folder (``RUNS_FILE``, or the name older versions used), if any."""
    return next((p for p in (folder / RUNS_FILE, folder / _LEGACY_RUNS_FILE) if p.is_file()), None)


def read_runs_state(folder: Path) -> dict[str, Any]:
    """The tracker's state in ``folder``: run ids, progress and recorded ends (empty for a new folder)."""
    path = runs_state_file(Path(folder))
    return dict(json.loads(path.read_text())) if path is not None else {"parent": None, "trials": {}}


def check_runs_state(exp: Path) -> None:
    """Refuse, with one line naming the file, the field and the rule, an experiment folder whose tracker state
    file (the one ``Tracker`` reads) is in no form the tracker writes or names a path it must not read."""
    exp = Path(exp).resolve()
    path = runs_state_file(exp)
    if path is None:
        return
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DednInputError(path, "state", "not JSON: not a file the tracker wrote") from None
    field, rule = _broken(state, exp)
    if rule:
        raise DednInputError(path, field, rule)


def _broken(state: Any, exp: Path) -> tuple[str, str | None]:
    """(field, the rule it breaks) for the first field of ``state`` in no form the tracker writes; ("", None) else."""
    if not isinstance(state, dict):
        return "state", "must be a JSON object"
    if state.get("parent") is not None and not _is_id(state["parent"]):
        return "parent", "must be a run id (letters, digits, '-' or '_') or null"
    if "experiment_id" in state and not _is_id(state["experiment_id"]):
        return "experiment_id", "must be an experiment id (letters, digits, '-' or '_')"
    maps: dict[str, tuple[Callable[[Any], bool], str]] = {
        "trials": (_is_id, "a run id"),
        "last_epoch": (_is_count, "a whole number >= 0"),
        "retries": (_is_count, "a whole number >= 0"),
        "ends": (lambda v: isinstance(v, dict), "a JSON object"),
    }
    for name, (check, kind) in maps.items():
        value = state.get(name, {})
        if not isinstance(value, dict):
            return name, "must be a JSON object"
        bad = next((key for key, item in value.items() if not check(item)), None)
        if bad is not None:
            return f"{name}.{bad}", f"must be {kind}"
    abandoned = state.get("abandoned", [])
    if not isinstance(abandoned, list) or not all(isinstance(k, str) for k in abandoned):
        return "abandoned", "must be a list of run keys"
    for key, end in state.get("ends", {}).items():
        field, rule = _broken_end(end, exp)
        if rule:
            return f"ends.{key}.{field}", rule
    return "", None


def _broken_end(end: dict[str, Any], exp: Path) -> tuple[str, str | None]:
    if end.get("status") not in END_STATUSES:
        return "status", f"must be one of {', '.join(END_STATUSES)}"
    if end.get("reason") is not None and not isinstance(end["reason"], str):
        return "reason", "must be text or null"
    path = end.get("path")
    if path is not None:
        if not isinstance(path, str) or not path:
            return "path", "must be a folder's path or null"
        rule = _outside(Path(path), exp)
        if rule:
            return "path", rule
    epochs = end.get("epochs")
    if epochs is None:
        return "", None
    if not isinstance(epochs, dict):
        return "epochs", "must be a JSON object or null"
    member, prefixes = epochs.get("member"), epochs.get("prefixes")
    if member is not None and not _is_count(member):
        return "epochs.member", "must be a whole number >= 0 or null"
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
        return "epochs.prefixes", "must be a list of metric name prefixes"
    file = epochs.get("file")
    if not isinstance(file, str) or not _is_result_file(Path(file), exp):
        return "epochs.file", (
            f"must be a trial's result.json in {exp} or in Ray's driver staging folder of the same experiment"
        )
    return "", None


def _outside(path: Path, exp: Path) -> str | None:
    """Why the checkpoint folder ``path`` may not be uploaded (None: it may): it must lie inside the experiment
    folder once links are followed, and hold only plain files and folders."""
    real = path.resolve()
    if real == exp or not real.is_relative_to(exp):
        return f"must lie inside the experiment folder {exp}"
    for root, dirs, files in os.walk(real):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                return f"must hold no links: {os.path.join(root, name)} is one"
    return None


def _is_result_file(path: Path, exp: Path) -> bool:
    """A trial's ``result.json``: ``<exp>/<trial>/result.json``, or Ray's driver staging copy of it,
    ``.../<experiment name>/driver_artifacts/<trial>/result.json``, with ``<trial>`` a folder of the experiment.
    Judged on the path with links followed, so a link cannot point it elsewhere."""
    real = path.resolve()
    trial = real.parent.name
    if real.name != "result.json" or trial in ("", ".", "..") or not (exp / trial).is_dir():
        return False
    trial_root = real.parent.parent
    return trial_root == exp or (trial_root.name == "driver_artifacts" and trial_root.parent.name == exp.name)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value.replace("-", "").replace("_", "").isalnum()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_state_runs(client: Any, state: dict[str, Any], name: str, exp: Path, page: int = 1000) -> None:
    """Refuse, naming the state file of the experiment folder ``exp``, a tracker state whose ``experiment_id`` is
    not the MLflow experiment named ``name`` or whose parent or trial runs are not runs of it: the resumed tracker
    would reopen, log to and end runs of another search. ``client``: an ``MlflowClient`` on the tracking store; one
    look-up of the experiment and one listing of its runs (``page`` per call)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    named = {"parent": state.get("parent"), **{f"trials.{k}": v for k, v in state.get("trials", {}).items()}}
    if not any(named.values()):
        return
    source = runs_state_file(Path(exp)) or Path(exp)
    rule = f"must be the id of this search's MLflow experiment {name!r}"
    try:
        experiment = client.get_experiment(str(state.get("experiment_id")))
    except MlflowException as e:  # no such experiment, or not an id; anything else (the store went away) is raised
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise
        experiment = None
    if experiment is None or experiment.name != name:
        raise DednInputError(source, "experiment_id", rule)
    known: set[str] = set()
    token = None
    while True:
        runs = client.search_runs(
            [experiment.experiment_id], run_view_type=ViewType.ALL, max_results=page, page_token=token
        )
        known.update(r.info.run_id for r in runs)
        token = runs.token
        if not token:
            break
    for field, run_id in named.items():
        if run_id and run_id not in known:
            raise DednInputError(source, field, f"run {run_id} is not a run of this search's experiment {name!r}")
