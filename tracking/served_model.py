"""Open a DEDN model from the registry, a run or a folder without running anything it carries (as
``mlflow.pyfunc.load_model`` would): the ``MLmodel`` is read as safe YAML, anything but the project's models-from-code
form refused, and the installed ``Classifier`` built from the checkpoint's safetensors, YAML and JSON only."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dedn.errors import DednInputError
from dedn.safe_yaml import load_mapping
from tracking.databases import check_existing_store
from tracking.store import resolve_tracking_uri

__all__ = [
    "CODE_FILE",
    "check_model_folder",
    "code_matches",
    "example_input",
    "fetched_model",
    "model_signature",
    "open_model",
]

CODE_FILE = Path(__file__).resolve().parent / "pyfunc_model.py"
LOADER = "mlflow.pyfunc.loaders.code_model"
_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a local model folder"
_PF = "flavors.python_function"
_PICKLES = (".pkl", ".pickle", ".cloudpickle", ".joblib")


def _listing(names: list[str], what: str, limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{what}: {', '.join(names[:limit])}{more}" if names else f"no {what}"


def check_model_folder(folder: Path, label: str) -> tuple[Path, Path]:
    """(checkpoint folder, logged code file) of a models-from-code folder; refuses any other, naming ``label``."""
    src = f"{label}/MLmodel"
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise DednInputError(src, "MLmodel", "missing: not an MLflow model")
    try:
        doc = load_mapping(mlmodel, "MLmodel")
    except DednInputError as e:  # named by the model, not by a temporary download folder
        raise DednInputError(src, e.field, e.rule) from None
    flavors = doc.get("flavors")
    if not isinstance(flavors, dict) or not isinstance(flavors.get("python_function"), dict):
        raise DednInputError(src, "flavors", "no python_function flavour: not a DEDN model")
    if others := sorted(str(k) for k in flavors if k != "python_function"):
        rule = "only the project's models-from-code python_function is accepted (other flavours unpickle their model)"
        raise DednInputError(src, f"flavors.{others[0]}", rule)
    pf = flavors["python_function"]
    if "python_model" in pf:
        rule = f"a pickled python model ({pf['python_model']}): only the project's models-from-code form is accepted"
        raise DednInputError(src, f"{_PF}.python_model", rule)
    if pf.get("loader_module") != LOADER:
        rule = f"{pf.get('loader_module')!r} is not the models-from-code loader {LOADER}"
        raise DednInputError(src, f"{_PF}.loader_module", rule)
    if pf.get("code"):
        rule = "code paths are not the project's: a DEDN model carries no code but pyfunc_model.py"
        raise DednInputError(src, f"{_PF}.code", rule)
    code_path = pf.get("model_code_path")
    if not isinstance(code_path, str) or Path(code_path).name != CODE_FILE.name:
        rule = f"{code_path!r} is not the project's tracking/{CODE_FILE.name}"
        raise DednInputError(src, f"{_PF}.model_code_path", rule)
    artifacts = pf.get("artifacts")
    entry = artifacts.get("checkpoint") if isinstance(artifacts, dict) and set(artifacts) == {"checkpoint"} else None
    rel = entry.get("path") if isinstance(entry, dict) else None
    ckpt = (folder / rel).resolve() if isinstance(rel, str) and not Path(rel).is_absolute() else None
    if ckpt is None or not ckpt.is_relative_to(folder.resolve()) or not ckpt.is_dir():
        raise DednInputError(src, f"{_PF}.artifacts", "must be one 'checkpoint' folder inside the model folder")
    found = [p for p in sorted(folder.rglob("*")) if p.suffix in _PICKLES or p.name in ("code", "python_model.pkl")]
    if found:
        where = f"{label}/{found[0].relative_to(folder).as_posix()}"
        raise DednInputError(where, "file", "a pickle or code folder in the model: refusing to open it")
    return ckpt, folder / CODE_FILE.name


def model_signature(feature_shape: tuple[int, int, int], image: bool = False) -> Any:
    """The signature a DEDN model is logged with: float32 feature maps (N, C, H, W) in (MLflow refuses another dtype
    or shape before the model runs; a JSON request is read as float32), or with ``image`` MLflow's convention for
    binary input, a column ``image`` of encoded pictures (base64 in JSON); its prediction columns out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    columns = [("long", "class_index"), ("string", "class_name"), ("float", "score"), ("boolean", "seen")]
    inputs = Schema([ColSpec("binary", "image")] if image else [TensorSpec(np.dtype(np.float32), (-1, *feature_shape))])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(kind, name) for kind, name in columns]))


def example_input(feature_shape: tuple[int, int, int], image: bool = False) -> Any:
    """The input example logged with a model: two zero feature maps, or two small PNG pictures."""
    import io

    import numpy as np

    if not image:
        return np.zeros((2, *feature_shape), dtype=np.float32)
    import pandas as pd
    from PIL import Image

    blobs = []
    for shade in (64, 192):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (shade, 128, 255 - shade)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return pd.DataFrame({"image": blobs})


def code_matches(code_file: Path) -> bool:
    """Whether the logged code file is the installed ``tracking/pyfunc_model.py`` byte for byte."""
    return code_file.is_file() and code_file.read_bytes() == CODE_FILE.read_bytes()


def _artifact_source(model_uri: str, tracking_uri: str) -> str:
    """Where a ``models:/`` or ``runs:/`` URI downloads from; refuses an unknown model, alias, version or run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].split("/", 1)[0]
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        with contextlib.suppress(MlflowException):
            client.get_run(run_id)
            return model_uri
        try:
            exps = [e.experiment_id for e in client.search_experiments(max_results=1000)]
            models = client.search_logged_models(experiment_ids=exps, max_results=100) if exps else []
            runs = sorted({str(m.source_run_id) for m in models if m.source_run_id})
        except MlflowException:
            runs = []
        listing = _listing(runs, "runs with a logged model")
        raise DednInputError(model_uri, "--model", f"no run {run_id!r} in {tracking_uri} ({listing})")
    body = model_uri[len("models:/") :]
    if "@" in body:
        name, alias, version = *body.split("@", 1), None
    elif "/" in body and body.rsplit("/", 1)[1].isdigit():
        name, alias, version = body.rsplit("/", 1)[0], None, body.rsplit("/", 1)[1]
    else:
        raise DednInputError(model_uri, "--model", f"not a model URI: give {_FORMS}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        names = _listing(sorted(m.name for m in client.search_registered_models(max_results=1000)), "registered models")
        rule = f"no registered model {name!r} in {tracking_uri} ({names})"
        raise DednInputError(model_uri, "--model", rule) from None
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
    have = _listing(versions, "versions")
    if alias is not None:
        aliases = {str(k): str(v) for k, v in (rm.aliases or {}).items()}
        if alias not in aliases:
            rule = f"model {name!r} has no alias {alias!r} ({_listing(sorted(aliases), 'aliases')}; {have})"
            raise DednInputError(model_uri, "--model", rule)
        version = str(aliases[alias])
    if version not in versions:
        raise DednInputError(model_uri, "--model", f"model {name!r} has no version {version} ({have})")
    return str(client.get_model_version_download_uri(name, version))


@contextlib.contextmanager
def fetched_model(model_uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """The model as a local folder: the folder given, or a temporary download (removed after) that opens nothing."""
    if model_uri.startswith(("models:/", "runs:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        uri = resolve_tracking_uri(tracking_uri)
        check_existing_store(uri)
        source = _artifact_source(model_uri, uri)
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
    """``model_uri`` as the installed ``dedn.classifier.Classifier``, loaded from safetensors, YAML and JSON (no
    pickle) once its folder passed ``check_model_folder`` (with ``installed_code``, ``code_matches`` too)."""
    with fetched_model(model_uri, tracking_uri) as folder:
        checkpoint, code = check_model_folder(folder, model_uri)
        if installed_code and not code_matches(code):
            rule = "the logged code is not the installed tracking/pyfunc_model.py"
            raise DednInputError(f"{model_uri}/{CODE_FILE.name}", f"{_PF}.model_code_path", rule)
        from dedn.classifier import Classifier

        try:
            return Classifier(checkpoint)
        except DednInputError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            rule = f"cannot be read: {type(e).__name__}: {first}"
            raise DednInputError(f"{model_uri}/checkpoint", "checkpoint", rule) from None
