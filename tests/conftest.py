"""Shared fixtures: tiny real stores built in temporary folders, and a real ``mlflow server``. Plain helpers
(the real benchmark files, search specs, ...) are in ``tests/helpers.py``."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, start_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run with --run-gpu")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not config.getoption("--run-gpu"):
            item.add_marker(skip_gpu)


# What a run writes and git ignores (README, Layout): git status does not show these, so they are walked.
_RUN_OUTPUTS = ("mlflow.db", "mlruns", "runs", "mlartifacts")


def _repository_outputs() -> dict[str, tuple[int, int]]:
    """Untracked files git sees in the repository, and every file or folder under the run outputs it
    ignores, each with (size, mtime) so a rewritten ``mlflow.db`` counts too. Tens of milliseconds."""
    found: dict[str, tuple[int, int]] = {}
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if status.returncode == 0:
            found |= {entry[3:]: (0, 0) for entry in status.stdout.split("\0") if entry.startswith("?? ")}
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout: the run outputs below are still checked
    for name in _RUN_OUTPUTS:
        top = ROOT / name
        for path in [top, *top.rglob("*")] if top.is_dir() else [top] if top.exists() else []:
            st = path.lstat()
            found[path.relative_to(ROOT).as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="session", autouse=True)
def repository_left_alone() -> Iterator[None]:
    """Fail the run when the tests left files in the repository folder: an ``mlflow.db``, ``mlruns/``,
    ``runs/`` or ``mlartifacts/`` entry, or any untracked file, that was not there (or not so) when the
    run started."""
    before = _repository_outputs()
    yield
    new = sorted(path for path, sig in _repository_outputs().items() if before.get(path) != sig)
    if new:
        shown = ", ".join(new[:10]) + (f" and {len(new) - 10} more" if len(new) > 10 else "")
        pytest.fail(f"the tests left files in the repository {ROOT}: {shown}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dedn.data.synth import synth_builtin

    out = tmp_path_factory.mktemp("stores") / "tiny"
    synth_builtin(out)
    return out


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store (tables, the Default experiment), made once; tests use copies of it
    (``tests.helpers.new_store``): creating MLflow's tables takes seconds, a copy does not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real ``mlflow server`` (SQLite backend, artifacts in a temporary folder) on a loopback port."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_server(folder, port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


_SESSION_FOLDERS: list[str] = []  # made by pytest_configure, removed by pytest_unconfigure


def pytest_configure(config: pytest.Config) -> None:
    """Keep the user's config folder out of the tests: the resume-signing key of every search a test (or a
    command it starts) runs lives in a temporary XDG_CONFIG_HOME."""
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="dedn-tests-config-")
    # Nor the repository's tracking store: a search a test starts without --tracking-uri logs here (and
    # its artifacts go beside this file), never to ./mlflow.db and ./mlruns.
    tracking = Path(tempfile.mkdtemp(prefix="dedn-tests-mlflow-")) / "mlflow.db"
    _SESSION_FOLDERS.extend([os.environ["XDG_CONFIG_HOME"], str(tracking.parent)])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tracking}"


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's config and tracking folders go with it: every test and command it started has ended."""
    import shutil

    for folder in _SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)
    _SESSION_FOLDERS.clear()
