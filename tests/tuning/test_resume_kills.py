"""A search killed again and again at random moments, resumed each time, ends as if never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from tests.helpers import ROOT, child_runs, cli_argv, trial_rows, write_spec

EPOCHS, TRIALS, KILLS = 10, 3, 10


def _rows_seen(exp: Path) -> int:
    return sum(len(v) for v in trial_rows(exp).values())


def _kill_at_a_random_moment(proc: subprocess.Popen, exp: Path, rng: random.Random, cycle: int) -> str:
    """SIGKILL the driver's process group: on even cycles at any moment after it started (Ray starting,
    the state being restored, trials running), on odd ones (the first among them, so that there is an
    experiment to resume) once a new epoch was reported, then a little later. Returns what happened."""
    start, seen = time.time(), _rows_seen(exp)
    deadline = start + rng.uniform(0.5, 12.0) if cycle % 2 == 0 else float("inf")
    while proc.poll() is None and time.time() < start + 240:
        if deadline == float("inf") and _rows_seen(exp) > seen:
            deadline = time.time() + rng.uniform(0.0, 2.5)
        if time.time() >= deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return f"killed after {time.time() - start:.1f} s"
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise AssertionError(f"cycle {cycle}: no progress in 240 s")
    return f"finished by itself (rc {proc.returncode})"


@pytest.mark.slow  # ten kills and resumes: the slow tier
@pytest.mark.parametrize("reuse_actors", [False, True], ids=["fresh-workers", "reused-workers"])
def test_every_trial_continues_after_repeated_driver_kills(
    tmp_path: Path, tiny_store: Path, reuse_actors: bool
) -> None:
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=EPOCHS,
        body=f"""
num_samples: {TRIALS}
max_concurrent_trials: 2
reuse_actors: {str(reuse_actors).lower()}
params:
  optim.lr: {{type: loguniform, low: 3.0e-4, high: 3.0e-3}}
  loss.eps: {{type: uniform, low: 0.0, high: 2.0}}
scheduler: {{type: fifo}}
""",
    )
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = runs / "kills"
    first = ["search", "-c", str(spec), "--name", "kills", "--storage-path", str(runs), "--tracking-uri", uri]
    resume = ["search", "-c", str(spec), "--resume", str(exp)]
    seed = int(os.environ.get("DEDN_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    log: list[str] = []
    kills = 0
    cycle = 0
    while kills < KILLS:
        cycle += 1
        args = first if not (exp / "tuner.pkl").is_file() else resume
        proc = subprocess.Popen(
            cli_argv(*args, "--no-final-test"),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            what = _kill_at_a_random_moment(proc, exp, rng, cycle)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err = proc.stderr.read() if proc.stderr else ""
        log.append(f"cycle {cycle} ({args[3]}): {what}, {_rows_seen(exp)} rows")
        if what.startswith("finished"):
            assert proc.returncode == 0, f"seed {seed}: " + "; ".join(log) + "\n" + err[-3000:]
            break  # the search ended before ten kills could land: nothing left to interrupt
        kills += 1
    assert cycle <= 3 * KILLS, f"seed {seed}: " + "; ".join(log)

    r = subprocess.run(cli_argv(*resume, "--no-final-test"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"seed {seed}: " + "; ".join(log) + "\n" + (r.stdout + r.stderr)[-3000:]

    after = trial_rows(exp)
    assert len(after) == TRIALS, f"seed {seed}: {sorted(after)}"
    for k, v in after.items():  # every trial reached its last epoch and no epoch is missing
        assert sorted({x["epoch"] for x in v}) == list(range(1, EPOCHS + 1)), (seed, k, [x["epoch"] for x in v])
    trials = [p.parent for p in exp.glob("*/params.json")]
    assert len(trials) >= TRIALS, (seed, trials)
    for trial in trials:  # no trial failed on the way
        assert not (trial / "error.txt").exists(), (seed, trial.name, (trial / "error.txt").read_text()[-2000:])
    study = optuna.load_study(study_name="kills", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == TRIALS, seed
    runs = child_runs(uri, "kills")
    # a trial started after Tune last saved its state, then killed: the resumed search asked again in its place
    abandoned = [r for r in runs if "dedn.abandoned" in r.data.tags]
    finished = [r for r in runs if "dedn.abandoned" not in r.data.tags]
    assert len(finished) == TRIALS and all(run.info.status == "FINISHED" for run in finished), seed
    assert all(r.info.status == "KILLED" for r in abandoned), seed
    tune_ids = {v[0]["trial_id"] for v in after.values() if v}
    assert not {r.data.tags["dedn.trial_id"] for r in abandoned} & tune_ids, seed
    failed = {str(t.number) for t in study.trials if t.state == optuna.trial.TrialState.FAIL}
    assert {r.data.tags["optuna.trial_number"] for r in abandoned} <= failed, seed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run in finished:  # each epoch logged once, whatever the kills interrupted
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_H"))
        assert steps == list(range(1, EPOCHS + 1)), (seed, steps)
