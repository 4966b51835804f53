"""A node dies mid-search: a cluster of three real ``ray start`` nodes on this machine (token authentication on),
one of them killed with SIGKILL while it trains a trial, and a fourth node that joins afterwards.

The dead node's trial is retried on a surviving or joining node from its last checkpoint in the shared storage
path, the search finishes, and no trial, epoch, Optuna trial or MLflow run is lost or duplicated."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from tests.cluster.nodes import RayNodes
from tests.helpers import ROOT, child_runs, cli_argv, trial_rows, wait_for, write_spec

pytestmark = pytest.mark.slow  # four Ray nodes and a search across them

TRIALS, EPOCHS = 5, 30
_SPEC = f"""
num_samples: {TRIALS}
max_concurrent_trials: 3
max_failures: 3
checkpoint_every: 1
params:
  optim.lr: {{type: loguniform, low: 3.0e-4, high: 3.0e-3}}
scheduler: {{type: fifo}}
"""


@pytest.fixture
def three_nodes() -> Iterator[RayNodes]:
    nodes = RayNodes.create()
    try:
        nodes.generate_token()
        nodes.start("head", head=True)
        nodes.start("a")
        nodes.start("b")
        nodes.wait_active()
        yield nodes
    finally:
        nodes.stop_all()


def test_a_killed_node_loses_nothing_and_a_joining_node_gets_trials(
    three_nodes: RayNodes, tmp_path: Path, tiny_store: Path
) -> None:
    spec = write_spec(tmp_path, tiny_store, epochs=EPOCHS, body=_SPEC)
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = runs / "loss"
    args = ["search", "-c", str(spec), "--name", "loss", "--storage-path", str(runs), "--tracking-uri", uri]
    args += ["--address", three_nodes.address, "--no-final-test"]
    head, a, b = three_nodes.nodes
    victim = b.node_id()
    log = tmp_path / "search.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cli_argv(*args),
            cwd=ROOT,
            env={**three_nodes.env, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def victim_rows() -> list[dict]:
            return [r for v in trial_rows(exp).values() for r in v if r["node_id"] == victim]

        before = wait_for(lambda: [r for r in victim_rows() if r["epoch"] >= 3], 600, "epoch 3 of a trial on node b")
        three_nodes.kill(b)  # while its trial trains
        killed_trial = before[0]["trial_id"]
        c = three_nodes.start("c")  # joins mid-search
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
    text = log.read_text()
    assert rc == 0, text[-4000:]

    rows = trial_rows(exp)
    assert len(rows) == TRIALS
    for v in rows.values():  # every trial reached its last epoch, no epoch missing
        assert sorted({r["epoch"] for r in v}) == list(range(1, EPOCHS + 1)), [r["epoch"] for r in v]
    killed = next(v for v in rows.values() if v[0]["trial_id"] == killed_trial)
    on_b = [r["epoch"] for r in killed if r["node_id"] == victim]
    after = [r for r in killed if r["node_id"] != victim]
    assert on_b and after and after[0]["epoch"] > 1  # retried elsewhere from a checkpoint, not from scratch
    assert after[0]["epoch"] <= max(on_b) + 1  # and no epoch skipped
    assert any(r["node_id"] == c.node_id() for v in rows.values() for r in v), "the joining node got no trial"

    study = optuna.load_study(study_name="loss", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["tune_trial_id"] for t in study.trials}) == TRIALS
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in study.trials)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    children = child_runs(uri, "loss")
    assert len(children) == TRIALS and all(r.info.status == "FINISHED" for r in children)
    for run in children:  # each epoch logged once, the retried ones included
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_H"))
        assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, steps)
    retried = next(r for r in children if r.data.tags["dedn.trial_id"] == killed_trial)
    assert int(retried.data.tags["dedn.retries"]) >= 1
    assert {head.node_id(), a.node_id()} & {r["node_id"] for v in rows.values() for r in v}
