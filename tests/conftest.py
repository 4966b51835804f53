"""Shared fixtures: tiny real stores built in temporary folders, and the real benchmark files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ZSL = Path(os.environ.get("DEDN_ZSL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsl"))


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


def zsl_dir(name: str) -> Path:
    """The real benchmark folder, or skip the test with the reason."""
    path = ZSL / name
    if not (path / "att_splits.mat").is_file():
        pytest.skip(f"real benchmark files not found at {path} (set DEDN_ZSL_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dedn.data.synth import synth_builtin

    out = tmp_path_factory.mktemp("stores") / "tiny"
    synth_builtin(out)
    return out
