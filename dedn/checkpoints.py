"""Checkpoint files: a trained model's folder (safetensors weights, resolved config, store header) and a
trial's resumable state (``state.pt`` of tensors read back with weights_only=True, ``progress.json``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dedn.config import TrainConfig, dump_config, validate_config
from dedn.data.store import FeatureStore
from dedn.errors import DednInputError
from dedn.model import DEDN, ModelConfig
from dedn.outputs import temp_sibling
from dedn.records import EpochRecord, Progress
from dedn.safe_yaml import load_mapping

TRIAL_STATE, TRIAL_PROGRESS = "state.pt", "progress.json"  # a trial checkpoint's two files


def checkpoint_header(store: FeatureStore) -> dict[str, Any]:
    """What a checkpoint records of the store it was trained on (enough to serve it without the store); for a store
    ``dedn data extract`` wrote, how its features were made (the trunk, its weights' SHA-256 and file, the
    preprocessing), so that the model can be shipped with its trunk."""
    extraction = store.meta.provenance.get("extraction")
    if extraction:
        keys = ("trunk", "weights_sha256", "size", "dtype", "preprocessing")
        weights = (store.meta.provenance.get("inputs") or {}).get("weights")
        extraction = {**{k: extraction[k] for k in keys if k in extraction}, "weights_file": weights}
    return {
        "fingerprint": store.meta.fingerprint,
        "dataset": store.meta.name,
        "feature_shape": list(store.meta.feature_shape),
        "num_attributes": store.meta.num_attributes,
        "semantic_dim": store.meta.semantic_dim,
        "class_names": store.classes.names,
        "seen": store.classes.seen.tolist(),
        "attribute_names": store.attributes.names,
        **({"extraction": extraction} if extraction else {}),
    }


def save_checkpoint(
    folder: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    cfg: TrainConfig,
    store: FeatureStore | dict[str, Any],
    partition: np.ndarray,
    extra: dict[str, Any],
) -> Path:
    """model.safetensors + config.yaml + checkpoint.json, written to a temporary folder then renamed.

    ``store``: the training store, or its ``checkpoint_header``."""
    from safetensors.torch import save

    header = store if isinstance(store, dict) else checkpoint_header(store)
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        # serialised in memory and written by Python: a full disk is then an OSError (ENOSPC), not
        # safetensors' own error type
        (tmp / "model.safetensors").write_bytes(save({k: v.contiguous() for k, v in state.items()}))
        (tmp / "config.yaml").write_text(dump_config(cfg))
        meta = {
            **header,
            "partition": [int(i) for i in partition],
            "inference": cfg.inference.model_dump(),
            **extra,
        }
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(type(x).__name__)


def load_checkpoint(folder: str | os.PathLike[str], device: str = "cpu") -> tuple[DEDN, TrainConfig, dict[str, Any]]:
    """Rebuild the model from a checkpoint folder (safetensors; no pickle)."""
    from safetensors.torch import load_file

    p = Path(folder)
    for name in ("model.safetensors", "config.yaml", "checkpoint.json"):
        if not (p / name).is_file():
            raise DednInputError(p / name, "file", "missing from the checkpoint folder")
    cfg = validate_config(load_mapping(p / "config.yaml", "checkpoint config"), str(p / "config.yaml")).effective()
    meta = json.loads((p / "checkpoint.json").read_text())
    state = load_file(str(p / "model.safetensors"), device=device)
    c, h, w = meta["feature_shape"]
    k = len(meta["class_names"])
    model = DEDN(
        ModelConfig.from_section(cfg.model, meta["partition"]),
        torch.zeros(meta["num_attributes"], meta["semantic_dim"]) + 1.0,
        torch.ones(k, meta["num_attributes"]),
        channels=c,
        regions=h * w,
    )
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, meta


def save_trial_state(folder: str | os.PathLike[str], record: EpochRecord, p: Progress) -> None:
    """A trial's resumable state after ``record``: tensors to ``state.pt``, the rest to ``progress.json``."""
    torch.save(
        {"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(), "best_model": p.best_state},
        Path(folder) / TRIAL_STATE,
    )
    progress = {
        "epoch": record.epoch,
        "best_epoch": p.best_epoch,
        "partition": [int(i) for i in p.partition],
        "history": [asdict(r) for r in p.history],
    }
    (Path(folder) / TRIAL_PROGRESS).write_text(json.dumps(progress))


def read_trial_state(folder: str | os.PathLike[str], mmap: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial checkpoint's (state, progress), read safely (tensors and plain values only: ``weights_only``); a file
    that is not one is a DednInputError naming it. ``mmap`` leaves the tensors on disk (a check reads little)."""
    path = Path(folder) / TRIAL_STATE
    try:
        with warnings.catch_warnings():  # torch warns of the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            # mmap reads torch's zip form only; anything else is read whole, by the same restricted unpickler
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError:  # torch's own text goes on to suggest weights_only=False: not given here
        why = "UnpicklingError: it holds more than tensors and plain values, so it is not loaded (nothing in it ran)"
        raise DednInputError(path, "checkpoint", why) from None
    except Exception as e:  # a torn or truncated file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DednInputError(
            path, "checkpoint", f"not a readable trial checkpoint: {type(e).__name__}: {first}"
        ) from None
    path = Path(folder) / TRIAL_PROGRESS
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DednInputError(path, "progress", f"not a trial's progress record: {type(e).__name__}: {e}") from None
    if not isinstance(progress, dict):
        raise DednInputError(path, "progress", f"must be a JSON object, got {type(progress).__name__}")
    return state, progress


def load_trial_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``save_trial_state`` wrote, as ``train(resume=...)`` takes it (plus ``partition``)."""
    state, progress = read_trial_state(folder)
    return {**state, "epoch": progress["epoch"], "history": progress["history"], "partition": progress["partition"]}


__all__ = [
    "TRIAL_PROGRESS",
    "TRIAL_STATE",
    "checkpoint_header",
    "load_checkpoint",
    "read_trial_state",
    "load_trial_state",
    "save_checkpoint",
    "save_trial_state",
]
