"""Plain helpers and constants shared by the test modules (pytest fixtures live in ``tests/conftest.py``;
the small hand-made store builders of the data tests in ``tests/data/helpers.py``).

Test modules import from here, never from one another.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
ZSL = Path(os.environ.get("DEDN_ZSL_DATA", ROOT.parent / "shared" / "data" / "zsl"))


def zsl_dir(name: str) -> Path:
    """The real benchmark folder, or skip the test with the reason."""
    path = ZSL / name
    if not (path / "att_splits.mat").is_file():
        pytest.skip(f"real benchmark files not found at {path} (set DEDN_ZSL_DATA)")
    return path


# --- Optuna -------------------------------------------------------------------------------------------------


def toy_space(t: Any) -> dict[str, Any]:
    """A small three-parameter space (log-float, float, int) for tests of Optuna's parts."""
    return {
        "lr": t.suggest_float("lr", 1e-4, 1e-1, log=True),
        "beta": t.suggest_float("beta", 0.0, 1.0),
        "k": t.suggest_int("k", 2, 9),
    }


def toy_objective(p: dict[str, Any]) -> float:
    """A smooth value over ``toy_space`` with its best at lr 10^-2.5, beta 0.3, k 9."""
    return -((math.log10(p["lr"]) + 2.5) ** 2) - (p["beta"] - 0.3) ** 2 + 0.01 * p["k"]


# --- searches -------------------------------------------------------------------------------------------


def write_spec(folder: Path, store: Path, *, epochs: int, body: str) -> Path:
    base = TINY_CONFIG.read_text().replace("epochs: 8", f"epochs: {epochs}")
    (folder / "base.yaml").write_text(base + "device: cpu\n")
    spec = folder / "spec.yaml"
    spec.write_text(f"base: base.yaml\nstore: {store}\n" + body)
    return spec


def trial_rows(experiment: Path) -> dict[str, list[dict]]:
    """Every trial's reported rows, read from Tune's result.json files. A last line that is not whole JSON is one
    Tune is still writing (a test polls while the search runs) and is left out; any other is an error."""
    out = {}
    for f in sorted(experiment.glob("*/result.json")):
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i < len(lines) - 1:
                    raise
        out[f.parent.name] = rows
    return out


def training_worker(experiment: Path, epoch: int) -> int | None:
    """The process id of the Ray worker training the experiment's one running trial, once the trial is known to
    have passed ``epoch``: by its checkpoints' ``reports.json`` / ``progress.json`` (the worker writes them as it
    reports) or by Tune's ``result.json`` rows, whichever is further (Tune's copy of the rows can lag behind the
    worker on a loaded machine, until after the last epoch). The worker is the process whose working folder is one
    of Tune's working folders of the experiment (Tune moves each trial's worker there); None while there is not
    exactly one."""
    done = max((r["epoch"] for rows in trial_rows(experiment).values() for r in rows), default=0)
    for f in [*experiment.glob("*/checkpoint_*/reports.json"), *experiment.glob("*/checkpoint_*/progress.json")]:
        try:
            done = max(done, int(json.loads(f.read_text())["epoch"]))
        except (OSError, ValueError, KeyError, TypeError):  # being written
            continue
    if done < epoch:
        return None
    workers = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:  # not a process, gone, or not ours
            continue
        if f"/{experiment.name}/working_dirs/" in cwd:
            workers.append(int(proc.name))
    return workers[0] if len(workers) == 1 else None


def child_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def cli_argv(*args: str) -> list[str]:
    """The command line that runs ``dedn ARGS`` in a fresh Python process."""
    return [sys.executable, "-c", "from cli.main import main; main()", *args]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def ctrl_c_at_its_default() -> Iterator[None]:
    """SIGINT handled in this process, and so at its default in the commands it starts (exec resets a handler), as
    from a terminal, however pytest was started: a script's background job (``bash .ci/run &``) runs with SIGINT
    ignored, its children inherit that, and a search keeps an ignored SIGINT ignored (tuning.interrupt)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- a real mlflow server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(folder: Path, port: int, backend: str = "") -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port``, its store ``backend`` (default: SQLite in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend or f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.time() + 90
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group whose leader is ``proc`` (started in a new session) by its id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def served_model(model_uri: str, tracking_uri: str, log: Path) -> Iterator[int]:
    """``mlflow models serve -m MODEL_URI`` on a free loopback port, as a user runs it (the local environment);
    yields the port once ``/ping`` answers, and stops the server's process group at the end."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        # MLflow starts uvicorn from PATH: the virtualenv's, as with the environment activated
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        end = time.time() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < end, "mlflow models serve did not answer /ping"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield port
        assert proc.poll() is None, "the server died"
    finally:
        stop_group(proc)


def released_sun_indicator() -> np.ndarray:
    """DEDN_Sun.py's module-level indicator in the authors' released code, transcribed statement by statement
    (its ``65-74`` and ``74-77``, negative single indices where slices were meant, included): 64/27/9/2."""
    indicator = np.array([0] * 102)
    indicator[38:65] = 1
    indicator[65 - 74] = 2
    indicator[77:85] = 2
    indicator[74 - 77] = indicator[85 - 102] = 3
    return indicator


# --- bad input ------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Everything under ``root`` (itself included): relative path -> (mode, size, mtime_ns). A refused
    command must leave it equal: no file written, touched, removed or re-permissioned."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def refused(
    args: list[str],
    *,
    cwd: Path,
    watch: list[Path],
    file: str | Path,
    field: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> str:
    """Run ``dedn ARGS`` in a fresh process and require a clean refusal: exit status 2, one line of output
    in all, ``error: <file>: <field>: <rule>`` naming ``file`` and ``field``, no traceback, and every folder
    in ``watch`` exactly as before. Returns the error line."""
    before = {str(w): tree(w) for w in watch}
    proc = subprocess.run(
        cli_argv(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, lines)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and f"{file}: " in line and f"{field}: " in line, (line, file, field)
    for w in watch:
        assert tree(w) == before[str(w)], f"{w} changed"
    return line


def new_store(empty_store: Path, path: Path) -> str:
    """A copy of the ``empty_store`` fixture's MLflow store at ``path``; its tracking URI."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, path)
    return f"sqlite:///{path}"
