"""Package boundaries: the core imports no search, cluster or tracking library, and loads lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_never_imports_ray_optuna_or_mlflow() -> None:
    code = (
        "import sys, pkgutil, importlib, dedn\n"
        "for m in pkgutil.walk_packages(dedn.__path__, 'dedn.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'optuna', 'mlflow', 'tuning', 'tracking', 'cluster'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_import_dedn_does_not_load_torch_and_exports_resolve() -> None:
    code = "import sys, dedn; print('torch' in sys.modules); print(dedn.pair_distance.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "dedn.losses"]
