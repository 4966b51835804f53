"""The MLflow pyfunc model of a DEDN checkpoint (``dedn.classifier.Classifier``), logged as "models from code" (no
pickled object).

What ``predict`` takes depends on the checkpoint folder:

- feature maps (the default): numpy (N, C, H, W), any float dtype;
- pictures, when the folder holds the trunk (``trunk.safetensors``, packaged by ``dedn promote`` from a store that
  ``dedn data extract`` wrote): a DataFrame with a binary column ``image`` of encoded pictures (JPEG, PNG, ...; base64
  in a JSON request). A row that is not a picture the model takes refuses the whole request with one line naming
  the row and the rule (an HTTP 400 from ``mlflow models serve``). Such a model runs on the GPU when torch sees one.

Either returns the classifier's DataFrame: ``class_index``, ``class_name``, ``score`` and ``seen``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from dedn.classifier import Classifier, PictureError

__all__ = ["BadRow", "DednModel"]


class BadRow(MlflowException):
    """A request row the model does not take: a 400 whose message is one line naming the row and the rule.

    MLflow's scoring server rewrites a model's error message to start with the whole request's text; this message
    keeps to its one line."""

    def __init__(self, line: str) -> None:
        self._line = line
        super().__init__(line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:  # the server's rewrite is not kept
        pass


class DednModel(PythonModel):
    def load_context(self, context: Any) -> None:
        self.classifier = Classifier(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        c = self.classifier
        if c.trunk is None:
            return c.predict_features(c.features(model_input))
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise BadRow(f"request: columns: need a column 'image' of encoded pictures, got {list(model_input)}")
            model_input = model_input["image"]
        try:
            pixels = c.prepare(model_input)
        except PictureError as e:
            raise BadRow(f"{e} (rows count from 0; nothing of the request was scored)") from None
        return c.predict_features(c.features_of(pixels))


mlflow.models.set_model(DednModel())
