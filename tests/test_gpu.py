"""GPU path: run with --run-gpu on a machine with CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.build import build_model
from dedn.config import load_config
from dedn.data import open_store
from dedn.partitions import resolve_partition
from dedn.train import train
from tests.helpers import ROOT, TINY_CONFIG

pytestmark = pytest.mark.gpu


def test_gpu_forward_agrees_with_cpu(tiny_store: Path) -> None:
    s = open_store(tiny_store)
    cfg = load_config(TINY_CONFIG, [f"data.store={tiny_store}"]).effective()
    part = resolve_partition(cfg, s)
    cpu = build_model(cfg, s, part, torch.device("cpu"))
    gpu = build_model(cfg, s, part, torch.device("cuda"))
    gpu.load_state_dict(cpu.state_dict())
    x = torch.from_numpy(s.features()[:64].astype(np.float32))
    with torch.no_grad():
        a = cpu.scores(cpu(x))[0]
        b = gpu.scores(gpu(x.cuda()))[0]
    assert a is not None and b is not None
    torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)  # TF32 allowed


def test_gpu_training_learns(tiny_store: Path) -> None:
    s = open_store(tiny_store)
    r = train(load_config(TINY_CONFIG, [f"data.store={tiny_store}", "device=cuda", "optim.epochs=6"]), s)
    assert all(np.isfinite(h.loss["total"]) for h in r.history)
    assert r.history[-1].eval["T"] > 0.5


def test_gpu_population_members_match_their_single_models(tiny_store: Path) -> None:
    from dedn.population import train_population

    s = open_store(tiny_store)
    sets = [f"data.store={tiny_store}", "device=cuda", "optim.epochs=2", "precision=float32"]
    cfgs = [load_config(TINY_CONFIG, [*sets, f"optim.lr={lr}"]) for lr in (5e-4, 2e-3)]
    pop = train_population(cfgs, s)
    for m, cfg in zip(pop, cfgs, strict=True):
        single = train(cfg, s)
        for a, b in zip(m.result.history, single.history, strict=True):
            assert a.loss["total"] == pytest.approx(b.loss["total"], rel=1e-3)


def test_gpu_check_script_runs_small() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--steps", "2", "--members", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "NO" not in out.split("2. Training")[0]  # every agreement check within its tolerance
