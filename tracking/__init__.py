"""tracking package: MLflow."""

import os

# MLflow sends usage data home unless told not to: not from this project, unless the user sets it to false
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__all__: list[str] = []
