"""Tune's ``result.json`` of a retried trial: the rows the driver wrote survive the copy Tune makes before the retry."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
from ray.tune.logger import JsonLoggerCallback

from tuning.record import ResultFile, reports


class _Trial(SimpleNamespace):
    __hash__ = object.__hash__  # Tune's loggers key their files by trial


def _retried_trial(tmp_path: Path, staged: list[int], uploaded: str | None) -> _Trial:
    """A trial Tune is about to retry from a checkpoint: the driver's staging copy of its ``result.json`` holds
    ``staged`` epochs, the experiment folder's copy ``uploaded`` (None: no copy yet). A stand-in for Tune's ``Trial``
    with the attributes its JSON logger reads: the fault, a copy read while Tune's background upload rewrites it, is
    a race that cannot be caused on demand."""
    staging, storage = tmp_path / "staging" / "trial-000", tmp_path / "runs" / "exp" / "trial-000"
    staging.mkdir(parents=True)
    storage.mkdir(parents=True)
    (staging / "result.json").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in staged))
    if uploaded is not None:
        (storage / "result.json").write_text(uploaded)
    fs = SimpleNamespace(trial_fs_path=str(storage), storage_filesystem=pyarrow.fs.LocalFileSystem())
    return _Trial(
        local_path=str(staging), config={"seed": 1}, checkpoint=object(), init_local_path=lambda: None, storage=fs
    )


def _retry(callback: JsonLoggerCallback, trial: _Trial, epochs: list[int]) -> list[int]:
    callback.log_trial_start(trial)
    for e in epochs:
        callback.log_trial_result(e, trial, {"epoch": e})
    callback.log_trial_end(trial)
    return [r["epoch"] for r in reports(Path(trial.local_path) / "result.json")]


def test_a_retried_trial_keeps_the_rows_an_upload_in_progress_would_drop(tmp_path: Path) -> None:
    mid_upload = json.dumps({"epoch": 1})[:7]  # the experiment folder's copy, caught while being rewritten
    # Tune's own logger loses epochs 1 to 4 (and 5, appended to the torn line): the fault is real
    plain = _retry(JsonLoggerCallback(), _retried_trial(tmp_path / "plain", [1, 2, 3, 4], mid_upload), [5, 6])
    assert plain == [6]
    ours = _retry(ResultFile(), _retried_trial(tmp_path / "ours", [1, 2, 3, 4], mid_upload), [5, 6])
    assert ours == [1, 2, 3, 4, 5, 6]


def test_a_restarted_driver_resumes_from_the_experiment_folder(tmp_path: Path) -> None:
    uploaded = "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3))
    trial = _retried_trial(tmp_path, [], uploaded)
    (Path(trial.local_path) / "result.json").unlink()  # a new driver's staging folder holds no copy
    assert _retry(ResultFile(), trial, [4]) == [1, 2, 3, 4]
    trial = _retried_trial(tmp_path / "behind", [1, 2], uploaded)  # a staging copy shorter than the upload: Tune's
    assert _retry(ResultFile(), trial, [4]) == [1, 2, 3, 4]
