"""A search stopped again and again at random moments (Ctrl-C, SIGTERM, SIGKILL), resumed each time, ends as if
never interrupted: exactly its trials in Tune, Optuna and MLflow, every epoch once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from tests.helpers import ROOT, child_runs, cli_argv, ctrl_c_at_its_default, trial_rows, write_spec

# 60 epochs of the tiny model in batches of 2 (`dedn train` at batch 2 ran 877 samples/s here, about 0.35 s an
# epoch, 20 s a trial): the search outlasts ten stops and resumes, each of which lets it train a few seconds
EPOCHS, TRIALS, KILLS = 60, 3, 10


def _rows_seen(exp: Path) -> int:
    return sum(len(v) for v in trial_rows(exp).values())


def _stop_at_a_random_moment(proc: subprocess.Popen, exp: Path, rng: random.Random, cycle: int, sig: int) -> str:
    """Send ``sig`` (SIGINT to the process group, as Ctrl-C in a terminal; SIGTERM to the driver, as ``kill``;
    SIGKILL to the group): on even cycles at any moment after the driver started (Ray starting, the state being
    restored, trials running), on odd ones (the first among them, so that there is an experiment to resume) once a
    new epoch was reported, then a little later. Returns what happened."""
    start, seen = time.time(), _rows_seen(exp)
    deadline = start + rng.uniform(0.5, 12.0) if cycle % 2 == 0 else float("inf")
    while proc.poll() is None and time.time() < start + 240:
        if deadline == float("inf") and _rows_seen(exp) > seen:
            deadline = time.time() + rng.uniform(0.0, 1.5)
        if time.time() >= deadline:
            if sig == signal.SIGTERM:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"cycle {cycle}: still running 60 s after {signal.Signals(sig).name}") from None
            return f"{signal.Signals(sig).name} after {time.time() - start:.1f} s (rc {proc.returncode})"
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise AssertionError(f"cycle {cycle}: no progress in 240 s")
    return f"finished by itself (rc {proc.returncode})"


@pytest.mark.slow  # ten stops and resumes each: the slow tier
@pytest.mark.parametrize(
    ("sig", "reuse_actors"),
    [
        (signal.SIGINT, True),
        (signal.SIGTERM, False),
        (signal.SIGKILL, False),
        (signal.SIGKILL, True),
    ],
    ids=["ctrl-c", "sigterm", "sigkill-fresh-workers", "sigkill-reused-workers"],
)
def test_every_trial_continues_after_repeated_driver_kills(
    tmp_path: Path, tiny_store: Path, sig: int, reuse_actors: bool
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
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("batch_size: 32", "batch_size: 2"))
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
        args = first if not exp.exists() else resume  # a search stopped in its start-up is resumed too
        err_path = tmp_path / f"cycle-{cycle}.err"
        with err_path.open("w") as err_file, ctrl_c_at_its_default():  # a file, not a pipe nobody reads while it runs
            proc = subprocess.Popen(
                cli_argv(*args, "--no-final-test"),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                start_new_session=True,
                # Tune copies result rows into the experiment folder with its state, every 10 s or more by default:
                # every 2 s here, so that a stop "once a new epoch was reported" lands a few epochs in, not twenty
                env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "2"},
            )
        try:
            what = _stop_at_a_random_moment(proc, exp, rng, cycle, sig)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err = err_path.read_text()
        log.append(f"cycle {cycle} ({args[3]}): {what}, {_rows_seen(exp)} rows")
        assert not what.startswith("finished"), f"seed {seed}: ended before ten stops: " + "; ".join(log) + err[-3000:]
        kills += 1
    assert cycle <= 3 * KILLS, f"seed {seed}: " + "; ".join(log)

    r = subprocess.run(cli_argv(*resume, "--no-final-test"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"seed {seed}: " + "; ".join(log) + "\n" + (r.stdout + r.stderr)[-3000:]

    after = trial_rows(exp)
    assert len(after) == TRIALS, f"seed {seed}: {sorted(after)}"
    for k, v in after.items():  # every trial reached its last epoch and no epoch is missing
        assert sorted({x["epoch"] for x in v}) == list(range(1, EPOCHS + 1)), (seed, k, [x["epoch"] for x in v])
    trials = sorted(p.parent.name for p in exp.glob("*/params.json"))
    assert trials == [f"trial-{n:03d}" for n in range(TRIALS)], (seed, trials)  # no trial lost, none asked again
    for trial in trials:  # no trial failed on the way
        error = exp / trial / "error.txt"
        assert not error.exists(), (seed, trial, error.read_text()[-2000:])
    study = optuna.load_study(study_name="kills", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * TRIALS, (seed, states)  # no extra trial, none failed
    runs = child_runs(uri, "kills")
    assert len(runs) == TRIALS and all(r.info.status == "FINISHED" for r in runs), (seed, [r.info for r in runs])
    tune_ids = {v[0]["trial_id"] for v in after.values() if v}
    assert {r.data.tags["dedn.trial_id"] for r in runs} == tune_ids, seed
    assert {r.info.run_name for r in runs} == set(trials), seed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run in runs:  # each epoch logged once, whatever the stops interrupted; Optuna's value is the run's best
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_H"))
        assert steps == list(range(1, EPOCHS + 1)), (seed, steps)
        value = study.trials[int(run.data.tags["optuna.trial_number"])].value
        assert value == pytest.approx(run.data.metrics["best_val_H"]), seed
