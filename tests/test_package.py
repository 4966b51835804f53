"""Package boundaries: the core imports no search, cluster or tracking library, and loads lazily."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def _project_imports(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (functions and ``TYPE_CHECKING`` blocks included): ``from
    pkg import sub`` counts as ``pkg.sub`` when ``sub`` is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = ROOT / node.module.replace(".", "/")
            subs = [f"{node.module}.{a.name}" for a in node.names if (base / f"{a.name}.py").is_file()]
            names = subs or [node.module]
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_imports_point_one_way_without_a_circle() -> None:
    """No module imports one that (through others) imports it back, and the packages keep their order:
    ``cli -> tuning -> tracking, cluster -> dedn`` (docs/architecture.md)."""
    graph = {_module_name(p): _project_imports(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    rank = {"dedn": 0, "tracking": 1, "cluster": 1, "tuning": 2, "cli": 3}
    upward = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if rank[d.split(".")[0]] > rank[m.split(".")[0]]
        or (d.split(".")[0] != m.split(".")[0] and rank[d.split(".")[0]] == rank[m.split(".")[0]])
    ]
    assert upward == []
    circles = []
    for start in graph:  # a path from a module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for d in graph[node]:
                if d == start:
                    circles.append(" -> ".join([*path, d]))
                elif d not in seen:
                    seen.add(d)
                    stack.append((d, [*path, d]))
    assert circles == []


ADAPTERS = (
    "cluster/ray_internals.py",
    "tracking/mlflow_store.py",
    "tuning/optuna_internals.py",
)  # the one place per library for private names
_LIBRARIES = ("ray", "optuna", "mlflow")


def _private(dotted: str) -> bool:
    return dotted.split(".")[0] in _LIBRARIES and any(p.startswith("_") for p in dotted.split(".")[1:])


def test_no_private_ray_optuna_or_mlflow_name_outside_the_adapters() -> None:
    """Outside ``ADAPTERS`` the code imports no underscored module or name of Ray, Optuna or MLflow, names none in a
    string (``importlib.import_module``, a logger), and reads no underscored attribute it does not define itself
    (``dedn/``, which imports none of the three, is left out of that last check)."""
    sources = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    trees = {p: ast.parse(p.read_text()) for p in sources}
    own: set[str] = set()  # underscored names the project defines: its own privates
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, (ast.AnnAssign)) and isinstance(node.target, ast.Name):
                own.add(node.target.id)
    bad = []
    for path, tree in trees.items():
        if path.relative_to(ROOT).as_posix() in ADAPTERS:
            continue
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                bad += [f"{where} import {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _LIBRARIES:
                names = [f"{node.module}.{a.name}" for a in node.names]
                bad += [f"{where} from {n}" for n in names if _private(n)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _private(node.value.split(" ")[0]):
                bad.append(f"{where} {node.value!r}")
            elif (
                isinstance(node, ast.Attribute)
                and path.relative_to(ROOT).parts[0] != "dedn"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
            ):
                bad.append(f"{where} .{node.attr}")
    assert bad == []


def test_what_the_quick_start_writes_is_ignored_by_git() -> None:
    """Every path the README's commands write in the clone (stores, experiments, the tracking store, predictions)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["data/tiny/meta.json", "runs/tiny/optuna.db", "mlflow.db", "mlruns/1/x/artifacts/a", "preds.parquet"]
    r = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(written), r.stdout + r.stderr
    kept = subprocess.run(["git", "check-ignore", "-q", "dedn/model.py"], cwd=ROOT)
    assert kept.returncode == 1  # the sources are not ignored
