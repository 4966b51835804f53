"""``dedn search --address`` against nodes started with ``ray start``, token authentication on, as a cluster
user runs it: without ``RAY_AUTH_MODE`` in the driver's environment, only the token in ``~/.ray/auth_token``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cluster.nodes import RayNodes
from tests.helpers import ROOT, child_runs, cli_argv, refused, trial_rows, write_spec

pytestmark = pytest.mark.slow  # starts two Ray nodes

_SPEC = """
num_samples: 4
max_concurrent_trials: 2
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
scheduler: {type: fifo}
"""


def test_search_runs_on_both_ray_start_nodes_with_token_auth(
    token_cluster: RayNodes, tmp_path: Path, tiny_store: Path
) -> None:
    spec = write_spec(tmp_path, tiny_store, epochs=3, body=_SPEC)
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "nodes", "--storage-path", str(runs), "--tracking-uri", uri]
    assert "RAY_AUTH_MODE" not in token_cluster.env  # the driver is not told about token authentication
    proc = subprocess.run(
        cli_argv(*args, "--address", token_cluster.address),
        cwd=tmp_path,
        env=token_cluster.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "InvalidAuthToken" not in out and "Unauthenticated" not in out
    assert token_cluster.token not in out
    assert "test once (retrained on trainval)" in out  # the final retrain ran as a task on the cluster
    rows = trial_rows(runs / "nodes")
    assert len(rows) == 4 and all(rows.values())
    nodes = {r["node_id"] for v in rows.values() for r in v}
    assert nodes == {n.node_id() for n in token_cluster.nodes}  # trials ran on the head and on the worker
    assert all(r["features_zero_copy"] for v in rows.values() for r in v)
    trials = child_runs(uri, "nodes")
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)


def _clean_ray_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)


def _search_args(tmp_path: Path, tiny_store: Path) -> tuple[list[str], Path]:
    spec = write_spec(tmp_path, tiny_store, epochs=2, body=_SPEC)
    runs = tmp_path / "runs"
    runs.mkdir()
    return ["search", "-c", str(spec), "--name", "join", "--storage-path", str(runs), "--no-tracking"], runs


def test_joining_without_the_token_is_one_line_with_the_fix(
    token_cluster: RayNodes, tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_ray_environ(monkeypatch)
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    args, runs = _search_args(tmp_path, tiny_store)
    address = token_cluster.address
    line = refused(
        [*args, "--address", address],
        cwd=tmp_path,
        watch=[home],
        file=address,
        field="--address",
        env={"HOME": str(home)},
    )
    assert "uses token authentication and no token was found here" in line
    for fix in ("`ray get-auth-token` on its head", "~/.ray/auth_token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        assert fix in line, fix
    assert token_cluster.token not in line
    assert list(runs.iterdir()) == []


def test_a_wrong_token_is_refused_in_one_line_without_showing_it(
    token_cluster: RayNodes, tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_ray_environ(monkeypatch)
    wrong = "0f" * 32
    args, runs = _search_args(tmp_path, tiny_store)
    address = token_cluster.address
    env = {"HOME": token_cluster.env["HOME"], "RAY_AUTH_TOKEN": wrong}  # the right file, overridden
    line = refused([*args, "--address", address], cwd=tmp_path, watch=[], file=address, field="--address", env=env)
    assert "refused the token from RAY_AUTH_TOKEN: use the cluster's token (`ray get-auth-token`" in line
    assert wrong not in line and token_cluster.token not in line
    assert list(runs.iterdir()) == []


_JOIN = """
import json, os, signal, sys
import ray
from cluster.connect import ray_session
before = signal.getsignal(signal.SIGTERM)
with ray_session(sys.argv[1]) as info:
    during = {"mode": os.environ.get("RAY_AUTH_MODE"), "nodes": len([n for n in ray.nodes() if n["Alive"]])}
print(json.dumps({**info, **during, "after": os.environ.get("RAY_AUTH_MODE"),
                  "handler_restored": signal.getsignal(signal.SIGTERM) is before}))
"""


def test_a_joined_session_sends_the_token_only_while_it_lasts(token_cluster: RayNodes) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_JOIN), token_cluster.address],
        cwd=ROOT,
        env=token_cluster.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["started"] is False and got["auth"] == "token" and got["mode"] == "token"
    assert got["nodes"] == 2
    assert got["address"].endswith(f":{token_cluster.port}")
    assert got["after"] is None and got["handler_restored"] is True


def _refusals(cluster: RayNodes, tmp_path: Path, store: Path, *wait: str) -> list[str]:
    """The lines of ``dedn search --gpus-per-trial 1`` on ``cluster`` (and ``--resource-wait`` when given), which
    must end in exit status 2 without a traceback and leave nothing in ``tmp_path``."""
    spec = write_spec(tmp_path, store, epochs=2, body=_SPEC)
    before = sorted(p.name for p in tmp_path.iterdir())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "big", "--storage-path", str(tmp_path / "runs"), "--tracking-uri"]
    args += [uri, "--address", cluster.address, "--gpus-per-trial", "1"]
    args += ["--resource-wait", *wait] if wait else []
    r = subprocess.run(cli_argv(*args), cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, (r.returncode, r.stdout + r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no mlflow.db
    # what the cluster's own processes log (a raylet's metrics agent, ...) Ray forwards to every driver
    return [x for x in (r.stdout + r.stderr).splitlines() if x.strip() and "(raylet)" not in x]


def test_a_trial_no_node_can_hold_stops_before_anything_is_made(
    token_cluster: RayNodes, tmp_path: Path, tiny_store: Path
) -> None:
    """A GPU per trial on a cluster of CPU nodes started by hand: no autoscaler can add a node, so one line at once,
    also with the default --resource-wait (ten minutes); no folder, no tracking store, no Optuna study."""
    for wait in ((), ("0",)):
        lines = _refusals(token_cluster, tmp_path, tiny_store, *wait)
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: dedn search: --gpus-per-trial: asks 1 GPU per trial"), lines
        assert f"no node of the cluster at {token_cluster.address} has that (the largest has 0)" in lines[0], lines
        assert lines[0].endswith("the cluster has no autoscaler to add one"), lines


_AUTOSCALING = {  # Ray's fake node provider: an autoscaler that launches nodes as processes on this machine
    "cluster_name": "fake",
    "max_workers": 1,
    "idle_timeout_minutes": 5,
    "upscaling_speed": 1.0,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "auth": {"ssh_user": "ubuntu"},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "cpu.worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 0},
    },
    "file_mounts": {},
    "file_mounts_sync_continuously": False,
    **dict.fromkeys(("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands"), []),
    **dict.fromkeys(("setup_commands", "head_setup_commands", "worker_setup_commands"), []),
    **dict.fromkeys(("head_start_ray_commands", "worker_start_ray_commands"), []),
}


def test_an_autoscaling_cluster_is_waited_for_then_refused_in_one_line(tmp_path: Path, tiny_store: Path) -> None:
    """A head whose autoscaler knows node types (``ray start --autoscaling-config``): a node could come, so the wait
    is said on stderr and ends, after --resource-wait, in the one line; nothing is left behind."""
    nodes = RayNodes.create()
    try:
        nodes.generate_token()
        config = nodes.root / "autoscaling.json"
        config.write_text(json.dumps(_AUTOSCALING))
        fake = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        nodes.start("head", head=True, extra=("--autoscaling-config", str(config)), env=fake)
        lines = _refusals(nodes, tmp_path, tiny_store, "4")
    finally:
        nodes.stop_all()
    assert len(lines) == 2, lines
    assert lines[0].startswith("waiting up to 4 s (--resource-wait) for a node with 1 GPU"), lines
    assert lines[1].startswith("error: dedn search: --gpus-per-trial: asks 1 GPU per trial"), lines
    assert lines[1].endswith("after waiting 4 s (--resource-wait)"), lines
