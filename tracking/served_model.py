"""Open a DEDN model from the registry, a run or a folder without running anything the model carries.

``mlflow.pyfunc.load_model`` runs whatever the model folder holds: a pickled ``python_model.pkl``, another
flavour's pickle, or the logged models-from-code file and its code paths, all from the artifact store.
``dedn predict`` and ``dedn promote`` instead read the model's ``MLmodel`` first (YAML, safely), refuse
anything but the project's own models-from-code form (one ``python_function`` flavour, the code-model
loader, ``pyfunc_model.py``, no code paths, one ``checkpoint`` artifact, no pickle in the folder), and then
build the model with the installed package's ``DednModel`` from the checkpoint's safetensors, YAML and
JSON only: the logged code is never executed. ``promote`` also requires the logged code to be the
installed ``tracking/pyfunc_model.py`` byte for byte, so what MLflow itself would run is the project's.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dedn.errors import DednInputError

__all__ = [
    "CODE_FILE",
    "LOADER",
    "check_model_folder",
    "code_matches",
    "fetched_model",
    "load_dedn_model",
    "model_signature",
    "open_model",
]

CODE_FILE = Path(__file__).resolve().parent / "pyfunc_model.py"
LOADER = "mlflow.pyfunc.loaders.code_model"
_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a local model folder"
_PF = "flavors.python_function"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(names: list[str], what: str, limit: int = 12) -> str:
    if not names:
        return f"no {what}"
    shown = ", ".join(names[:limit])
    return f"{what}: {shown}" + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_model_folder(folder: Path, label: str) -> tuple[Path, Path]:
    """Refuse a model folder that is not in the project's models-from-code form; returns (checkpoint
    folder, logged code file). ``label`` names the model in errors (its URI or folder)."""
    src = f"{label}/MLmodel"
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise DednInputError(src, "MLmodel", "missing: not an MLflow model")
    from dedn.safe_yaml import load_mapping

    try:
        doc = load_mapping(mlmodel, "MLmodel")
    except DednInputError as e:  # named by the model, not by a temporary download folder
        raise DednInputError(src, e.field, e.rule) from None
    flavors = doc.get("flavors")
    if not isinstance(flavors, dict) or not isinstance(flavors.get("python_function"), dict):
        raise DednInputError(src, "flavors", "no python_function flavour: not a DEDN model")
    others = sorted(str(k) for k in flavors if k != "python_function")
    if others:
        raise DednInputError(
            src,
            f"flavors.{others[0]}",
            "only the project's models-from-code python_function is accepted (other flavours unpickle their model)",
        )
    pf = flavors["python_function"]
    if "python_model" in pf:
        raise DednInputError(
            src,
            f"{_PF}.python_model",
            f"a pickled python model ({pf['python_model']}): only the project's models-from-code form is accepted",
        )
    if pf.get("loader_module") != LOADER:
        raise DednInputError(
            src, f"{_PF}.loader_module", f"{pf.get('loader_module')!r} is not the models-from-code loader {LOADER}"
        )
    if pf.get("code"):
        raise DednInputError(
            src, f"{_PF}.code", "code paths are not the project's: a DEDN model carries no code but pyfunc_model.py"
        )
    code_path = pf.get("model_code_path")
    if not isinstance(code_path, str) or Path(code_path).name != CODE_FILE.name:
        raise DednInputError(
            src, f"{_PF}.model_code_path", f"{code_path!r} is not the project's tracking/{CODE_FILE.name}"
        )
    artifacts = pf.get("artifacts")
    entry = artifacts.get("checkpoint") if isinstance(artifacts, dict) and set(artifacts) == {"checkpoint"} else None
    rel = entry.get("path") if isinstance(entry, dict) else None
    ckpt = (folder / rel).resolve() if isinstance(rel, str) and not Path(rel).is_absolute() else None
    if ckpt is None or not ckpt.is_relative_to(folder.resolve()) or not ckpt.is_dir():
        raise DednInputError(src, f"{_PF}.artifacts", "must be one 'checkpoint' folder inside the model folder")
    for p in sorted(folder.rglob("*")):
        if p.suffix in (".pkl", ".pickle", ".cloudpickle", ".joblib") or p.name in ("code", "python_model.pkl"):
            raise DednInputError(
                f"{label}/{p.relative_to(folder).as_posix()}",
                "file",
                "a pickle or code folder in the model: refusing to open it",
            )
    return ckpt, folder / CODE_FILE.name


def model_signature() -> Any:
    """The MLflow signature a DEDN model is logged with: its output columns and no input schema.

    MLflow enforces a tensor input spec by exact dtype, so a float32 spec refuses the feature store's own
    float16 (and float64) before the model sees it. The model takes (N, C, H, W) features of any float
    dtype instead, checks their shape against its checkpoint itself (a ``ValueError`` naming both shapes)
    and scores in float32; a served model gets JSON numbers as float64 and gives the same predictions."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = Schema(
        [
            ColSpec("long", "class_index"),
            ColSpec("string", "class_name"),
            ColSpec("float", "score"),
            ColSpec("boolean", "seen"),
        ]
    )
    return ModelSignature(inputs=None, outputs=outputs)


def code_matches(code_file: Path) -> bool:
    """Whether the logged code file is the installed ``tracking/pyfunc_model.py`` byte for byte."""
    return code_file.is_file() and _sha256(code_file) == _sha256(CODE_FILE)


def load_dedn_model(checkpoint: Path, label: str) -> Any:
    """The installed ``DednModel``, loaded from a checkpoint folder (safetensors, YAML, JSON; no pickle)."""
    from tracking.pyfunc_model import DednModel

    model = DednModel()
    try:
        model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}, model_config=None))
    except DednInputError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DednInputError(
            f"{label}/checkpoint", "checkpoint", f"cannot be read: {type(e).__name__}: {first}"
        ) from None
    return model


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _registry_source(model_uri: str, tracking_uri: str) -> str:
    """The artifact location of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; refuses an unknown
    model, alias or version with what exists."""
    from mlflow.exceptions import MlflowException

    body = model_uri[len("models:/") :]
    if "@" in body:
        name, alias, version = *body.split("@", 1), None
    elif "/" in body and body.rsplit("/", 1)[1].isdigit():
        name, alias, version = body.rsplit("/", 1)[0], None, body.rsplit("/", 1)[1]
    else:
        raise DednInputError(model_uri, "--model", f"not a model URI: give {_FORMS}")
    client = _client(tracking_uri)
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise DednInputError(
            tracking_uri, "--model", f"no registered model {name!r} ({_listing(names, 'registered models')})"
        ) from None
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
    if alias is not None:
        aliases = {str(k): str(v) for k, v in (rm.aliases or {}).items()}
        if alias not in aliases:
            raise DednInputError(
                tracking_uri,
                "--model",
                f"model {name!r} has no alias {alias!r} ({_listing(sorted(aliases), 'aliases')}; {_listing(versions, 'versions')})",
            )
        version = str(aliases[alias])
    if version not in versions:
        raise DednInputError(
            tracking_uri, "--model", f"model {name!r} has no version {version} ({_listing(versions, 'versions')})"
        )
    return str(client.get_model_version_download_uri(name, version))


def _check_run(model_uri: str, tracking_uri: str) -> None:
    """Refuse ``runs:/RUN_ID/PATH`` for a run the store does not hold, listing runs with a logged model."""
    from mlflow.exceptions import MlflowException

    run_id = model_uri[len("runs:/") :].split("/", 1)[0]
    client = _client(tracking_uri)
    try:
        client.get_run(run_id)
        return
    except MlflowException:
        pass
    try:
        exps = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        models = client.search_logged_models(experiment_ids=exps, max_results=100) if exps else []
        runs = sorted({str(m.source_run_id) for m in models if m.source_run_id})
    except MlflowException:
        runs = []
    raise DednInputError(tracking_uri, "--model", f"no run {run_id!r} ({_listing(runs, 'runs with a logged model')})")


@contextlib.contextmanager
def fetched_model(model_uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """A local folder holding the model: the folder itself, or a temporary download of the registered
    version or the run's model (removed afterwards). Downloading opens nothing."""
    if model_uri.startswith(("models:/", "runs:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        from tracking.databases import check_existing_store
        from tracking.store import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        check_existing_store(uri)
        if model_uri.startswith("models:/"):
            source = _registry_source(model_uri, uri)
        else:
            _check_run(model_uri, uri)
            source = model_uri
        with tempfile.TemporaryDirectory(prefix="dedn-model-") as d:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=d, tracking_uri=uri)
            except (MlflowException, OSError) as e:
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise DednInputError(model_uri, "--model", f"cannot download the model: {first}") from None
            yield Path(local)
        return
    local_uri = model_uri.removeprefix("file://")
    if "://" in local_uri or local_uri.startswith(("models:", "runs:")):
        raise DednInputError(model_uri, "--model", f"not a model URI: give {_FORMS}")
    folder = Path(local_uri).expanduser()
    if not folder.is_dir():
        raise DednInputError(model_uri, "--model", f"no such model folder: give {_FORMS}")
    yield folder


def open_model(model_uri: str, tracking_uri: str | None, *, installed_code: bool = False) -> Any:
    """The model at ``model_uri`` as the installed ``DednModel``, after its folder passed
    ``check_model_folder``; with ``installed_code`` its logged code must also be the installed module's."""
    with fetched_model(model_uri, tracking_uri) as folder:
        checkpoint, code = check_model_folder(folder, model_uri)
        if installed_code and not code_matches(code):
            raise DednInputError(
                f"{model_uri}/{CODE_FILE.name}",
                f"{_PF}.model_code_path",
                "the logged code is not the installed tracking/pyfunc_model.py",
            )
        return load_dedn_model(checkpoint, model_uri)
