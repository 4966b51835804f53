"""Shared fixtures: tiny real stores built in temporary folders, and a real ``mlflow server``. Plain helpers
(the real benchmark files, search specs, ...) are in ``tests/helpers.py``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import free_port, start_server


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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dedn.data.synth import synth_builtin

    out = tmp_path_factory.mktemp("stores") / "tiny"
    synth_builtin(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real ``mlflow server`` (SQLite backend, artifacts in a temporary folder) on a loopback port."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_server(folder, port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def pytest_configure(config: pytest.Config) -> None:
    """Keep the user's config folder out of the tests: the resume-signing key of every search a test (or a
    command it starts) runs lives in a temporary XDG_CONFIG_HOME."""
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="dedn-tests-config-")
    # Nor the repository's tracking store: a search a test starts without --tracking-uri logs here (and
    # its artifacts go beside this file), never to ./mlflow.db and ./mlruns.
    tracking = Path(tempfile.mkdtemp(prefix="dedn-tests-mlflow-")) / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tracking}"
