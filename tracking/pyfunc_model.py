"""The MLflow pyfunc model of a DEDN checkpoint, logged as "models from code" (no pickled object).

``predict(features)`` takes a batch of feature maps, numpy (N, C, H, W) (any float dtype), and returns a
DataFrame: ``class_index``, ``class_name``, ``score`` (the GZSL score of the predicted class) and
``seen`` (whether that class was seen in training), scored with the checkpoint's inference parameters.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

__all__ = ["DednModel"]


class DednModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from dedn.checkpoints import load_checkpoint

        self.model, self.cfg, self.meta = load_checkpoint(context.artifacts["checkpoint"])
        self.unseen = ~torch.tensor(self.meta["seen"], dtype=torch.bool)
        inf = self.meta["inference"]
        self.lambda_rc, self.lambda_e, self.c = inf["lambda_rc"], inf["lambda_e"], inf["calibration"]

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        from dedn.model import mix_scores

        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        c, h, w = self.meta["feature_shape"]
        if x.ndim == 2 and x.shape[1] == c * h * w:
            x = x.reshape(-1, c, h, w)
        if x.shape[1:] != (c, h, w):
            raise ValueError(f"features must be (N, {c}, {h}, {w}) as the model was trained, got {x.shape}")
        rows = []
        with torch.no_grad():
            for s in range(0, len(x), 256):
                batch = torch.from_numpy(np.ascontiguousarray(x[s : s + 256], dtype=np.float32))
                p_ec, p_ef = self.model.scores(self.model(batch), self.lambda_rc)
                scores = mix_scores(p_ec, p_ef, self.lambda_e, self.c, self.unseen)
                top, arg = scores.max(dim=1)
                rows.append((arg.numpy(), top.numpy()))
        idx = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, dtype=np.int64)
        score = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, dtype=np.float32)
        names = np.asarray(self.meta["class_names"], dtype=object)
        seen = np.asarray(self.meta["seen"], dtype=bool)
        return pd.DataFrame({"class_index": idx, "class_name": names[idx], "score": score, "seen": seen[idx]})


mlflow.models.set_model(DednModel())
