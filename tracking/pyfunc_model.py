"""The MLflow pyfunc model of a DEDN checkpoint, logged as "models from code" (no pickled object).

What ``predict`` takes depends on the checkpoint folder:

- feature maps (the default): numpy (N, C, H, W), any float dtype;
- pictures, when the folder holds the trunk (``trunk.safetensors``, packaged by ``dedn promote`` from a store that
  ``dedn data extract`` wrote): a DataFrame with a binary column ``image`` of encoded pictures (JPEG, PNG, ...; base64
  in a JSON request), each decoded and prepared as the extraction did, through the trunk, cast to the store's dtype,
  then scored by the head. A row that is not a picture the model takes refuses the whole request with one line naming
  the row and the rule (an HTTP 400 from ``mlflow models serve``). Such a model runs on the GPU when torch sees one.

Either returns a DataFrame: ``class_index``, ``class_name``, ``score`` (the GZSL score of the predicted class) and
``seen`` (whether that class was seen in training), scored with the checkpoint's inference parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

__all__ = ["TRUNK_FILE", "BadRow", "DednModel"]

TRUNK_FILE = "trunk.safetensors"
TRUNK_BATCH = 16  # pictures per trunk pass, as extraction's default batch


class BadRow(MlflowException):
    """A request row the model does not take: a 400 whose message is one line naming the row and the rule.

    MLflow's scoring server rewrites a model's error message to start with the whole request's text; this message
    keeps to its one line."""

    def __init__(self, line: str, row: int | None = None, rule: str = "") -> None:
        self._line, self.row, self.rule = line, row, rule
        super().__init__(line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:  # the server's rewrite is not kept
        pass


class DednModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from dedn.checkpoints import load_checkpoint

        folder = Path(context.artifacts["checkpoint"])
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
            if torch.cuda.is_available():  # the trunk is most of the work: on the GPU where the server has one
                self.to(torch.device("cuda"))

    def to(self, device: torch.device) -> DednModel:
        """The head (and trunk) on ``device``; predictions come back on the CPU."""
        self.device = device
        self.model.to(device)
        self.unseen = self.unseen.to(device)
        if self.trunk is not None:
            self.trunk.to(device)
        return self

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        if self.trunk is not None:
            return self.predict_pixels(self.prepare(model_input))
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        c, h, w = self.meta["feature_shape"]
        if x.ndim == 2 and x.shape[1] == c * h * w:
            x = x.reshape(-1, c, h, w)
        if x.shape[1:] != (c, h, w):
            raise ValueError(f"features must be (N, {c}, {h}, {w}) as the model was trained, got {x.shape}")
        return self.predict_features(x)

    def prepare(self, model_input: Any) -> np.ndarray:
        """The pictures of a request (a DataFrame's ``image`` column, or a sequence of encoded pictures) as the trunk
        takes them, (N, 3, S, S) float32; BadRow for the first row that is not a picture the model takes."""
        from dedn.trunk import ImageError, open_image, prepare_image

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise BadRow(f"request: columns: need a column 'image' of encoded pictures, got {list(model_input)}")
            model_input = model_input["image"]
        rows = list(model_input)
        pixels = np.zeros((len(rows), 3, self.size, self.size), dtype=np.float32)
        for i, blob in enumerate(rows):
            if not isinstance(blob, bytes | bytearray | memoryview):
                raise BadRow(f"row {i}: image: must be an encoded picture (base64 in JSON), got {type(blob).__name__}")
            try:
                with open_image(blob) as img:
                    pixels[i] = prepare_image(img, self.size)
            except ImageError as e:
                line = f"row {i}: image: {e} (rows count from 0; nothing of the request was scored)"
                raise BadRow(line, i, str(e)) from None
        return pixels

    def predict_pixels(self, pixels: np.ndarray) -> pd.DataFrame:
        """Predictions for prepared pictures: the trunk's feature maps, cast to the dtype the head was trained on."""
        assert self.trunk is not None, "a feature-map model has no trunk"
        parts = []
        with torch.inference_mode():
            for s in range(0, len(pixels), TRUNK_BATCH):
                x = torch.from_numpy(np.array(pixels[s : s + TRUNK_BATCH], dtype=np.float32)).to(self.device)
                parts.append(self.trunk(x).float().cpu().numpy().astype(self.feature_dtype))
        c, h, w = self.meta["feature_shape"]
        return self.predict_features(np.concatenate(parts) if parts else np.zeros((0, c, h, w), np.float32))

    def predict_features(self, x: np.ndarray) -> pd.DataFrame:
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
        names = np.asarray(self.meta["class_names"], dtype=object)
        seen = np.asarray(self.meta["seen"], dtype=bool)
        return pd.DataFrame({"class_index": idx, "class_name": names[idx], "score": score, "seen": seen[idx]})


mlflow.models.set_model(DednModel())
