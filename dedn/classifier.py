"""A promoted DEDN model as it is served: the head of a checkpoint folder (``dedn.checkpoints``), and for a model that
takes pictures the trunk packaged beside it (``trunk.safetensors``): encoded pictures are decoded and prepared as the
extraction did, through the trunk, cast to the store's dtype, then scored by the head. Predictions are a DataFrame:
``class_index``, ``class_name``, ``score`` (the GZSL score of the predicted class) and ``seen`` (whether that class was
seen in training), scored with the checkpoint's inference parameters. ``tracking.pyfunc_model`` serves it in MLflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["TRUNK_FILE", "Classifier", "PictureError"]

TRUNK_FILE = "trunk.safetensors"
TRUNK_BATCH = 16  # pictures per trunk pass, as extraction's default batch


class PictureError(ValueError):
    """A request row that is not a picture the model takes: ``row`` (from 0) and the ``rule`` it breaks."""

    def __init__(self, row: int, rule: str) -> None:
        self.row, self.rule = row, rule
        super().__init__(f"row {row}: image: {rule}")


class Classifier:
    """The model of a checkpoint folder, on the CPU (or a GPU for one that takes pictures, where torch sees one)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from dedn.checkpoints import load_checkpoint

        folder = Path(folder)
        self.model, self.cfg, self.meta = load_checkpoint(folder)
        self.unseen = ~torch.tensor(self.meta["seen"], dtype=torch.bool)
        inf = self.meta["inference"]
        self.lambda_rc, self.lambda_e, self.c = inf["lambda_rc"], inf["lambda_e"], inf["calibration"]
        self.device = torch.device("cpu")
        self.trunk: torch.nn.Module | None = None
        if self.meta.get("input") == "image":
            from safetensors.torch import load_file

            from dedn.trunk import build_trunk

            self.trunk = build_trunk(load_file(str(folder / TRUNK_FILE)))
            self.size = int(self.meta["extraction"]["size"])
            self.feature_dtype = np.dtype(self.meta["extraction"]["dtype"])
            if torch.cuda.is_available():  # the trunk is most of the work: on the GPU where there is one
                self.to(torch.device("cuda"))

    def to(self, device: torch.device) -> Classifier:
        """The head (and trunk) on ``device``; predictions come back on the CPU."""
        self.device = device
        self.model.to(device)
        self.unseen = self.unseen.to(device)
        if self.trunk is not None:
            self.trunk.to(device)
        return self

    def features(self, model_input: Any) -> np.ndarray:
        """Feature maps as the model was trained on, (N, C, H, W), from an array or DataFrame (also flattened rows)."""
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        c, h, w = self.meta["feature_shape"]
        if x.ndim == 2 and x.shape[1] == c * h * w:
            x = x.reshape(-1, c, h, w)
        if x.shape[1:] != (c, h, w):
            raise ValueError(f"features must be (N, {c}, {h}, {w}) as the model was trained, got {x.shape}")
        return x

    def prepare(self, pictures: Any) -> np.ndarray:
        """Encoded pictures (a sequence of bytes) as the trunk takes them, (N, 3, S, S) float32; PictureError for the
        first that is not one the model takes."""
        from dedn.trunk import prepare_images

        rows = list(pictures)
        for i, blob in enumerate(rows):
            if not isinstance(blob, bytes | bytearray | memoryview):  # never a path: a request names no file
                raise PictureError(i, f"must be an encoded picture (base64 in JSON), got {type(blob).__name__}")
        pixels, errors = prepare_images(rows, self.size)
        bad = next((i for i, e in enumerate(errors) if e), None)
        if bad is not None:
            raise PictureError(bad, errors[bad])
        return pixels

    def features_of(self, pixels: np.ndarray) -> np.ndarray:
        """Prepared pictures through the trunk: feature maps cast to the dtype the head was trained on."""
        assert self.trunk is not None, "a feature-map model has no trunk"
        parts = []
        with torch.inference_mode():
            for s in range(0, len(pixels), TRUNK_BATCH):
                x = torch.from_numpy(np.array(pixels[s : s + TRUNK_BATCH], dtype=np.float32)).to(self.device)
                parts.append(self.trunk(x).float().cpu().numpy().astype(self.feature_dtype))
        c, h, w = self.meta["feature_shape"]
        return np.concatenate(parts) if parts else np.zeros((0, c, h, w), np.float32)

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index, its GZSL score) of each feature map, at the checkpoint's inference parameters."""
        from dedn.model import mix_scores

        rows = []
        with torch.no_grad():
            for s in range(0, len(x), 256):
                batch = torch.from_numpy(np.ascontiguousarray(x[s : s + 256], dtype=np.float32)).to(self.device)
                p_ec, p_ef = self.model.scores(self.model(batch), self.lambda_rc)
                scores = mix_scores(p_ec, p_ef, self.lambda_e, self.c, self.unseen)
                top, arg = scores.max(dim=1)
                rows.append((arg.cpu().numpy(), top.cpu().numpy()))
        idx = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, dtype=np.int64)
        score = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, dtype=np.float32)
        return idx, score

    def predict_features(self, x: np.ndarray) -> Any:
        """The predictions table of feature maps: ``class_index``, ``class_name``, ``score``, ``seen``."""
        import pandas as pd

        idx, score = self.classify(x)
        names = np.asarray(self.meta["class_names"], dtype=object)
        seen = np.asarray(self.meta["seen"], dtype=bool)
        return pd.DataFrame({"class_index": idx, "class_name": names[idx], "score": score, "seen": seen[idx]})
