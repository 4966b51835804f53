"""Package boundaries: the core imports no search, cluster or tracking library, and loads lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


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


PACKAGES = ("dedn", "tuning", "tracking", "cluster", "cli")


def _all_of(module_file: Path) -> set[str] | None:
    """The names in a module's ``__all__``, read from its source (None when it has none)."""
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return {e.value for e in ast.walk(value) if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return None


def test_every_module_lists_its_api_and_imports_only_exported_names() -> None:
    """Each module of the packages has ``__all__``; a ``from project.module import name`` anywhere in the
    repository names a submodule or an entry of that module's ``__all__``, never an underscored name."""
    sources = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    missing = [str(p.relative_to(ROOT)) for p in sources if _all_of(p) is None]
    assert missing == []
    bad = []
    for path in [*sources, *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES):
                continue
            base = ROOT / node.module.replace(".", "/")
            target = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            exported = _all_of(target) or set()
            for alias in node.names:
                if (base / f"{alias.name}.py").is_file() or alias.name == "__version__":
                    continue
                if alias.name.startswith("_") or alias.name not in exported:
                    bad.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert bad == []
