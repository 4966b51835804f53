"""Artifact uploads to a search's runs (``Tracker.artifacts``).

``MlflowClient.log_artifact`` asks the tracking store for the run (``runs/get``) before its first upload to it,
only to learn where its artifacts go; that location is already in the answer to ``create_run``. A population
search creates a run per member, several per second on many GPUs, and the tracking server is its limit: so the
runs the tracker creates are remembered with their artifact repository, and uploads to them go straight to it.
Other runs (a resumed search's, created by an earlier driver) go through the client as before.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracking.runs import Tracker

__all__ = ["RunArtifacts"]


class RunArtifacts:
    """``log_artifact``, ``log_artifacts`` and ``log_text`` with ``MlflowClient``'s signatures and results."""

    def __init__(self, tracker: Tracker, keep: int = 4096) -> None:
        self.t, self.keep = tracker, keep
        self.lock = threading.Lock()
        self.repos: OrderedDict[str, Any] = OrderedDict()  # run id -> its artifact repository, newest last

    def remember(self, run_id: str, artifact_uri: str) -> None:
        """The artifact location of a run just created (``create_run``'s answer)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(artifact_uri, tracking_uri=self.t.uri)
        with self.lock:
            self.repos[run_id] = repo
            while len(self.repos) > self.keep:
                self.repos.popitem(last=False)

    def _repo(self, run_id: str) -> Any:
        with self.lock:
            return self.repos.get(run_id)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        repo = self._repo(run_id)
        if repo is None:
            self.t.client.log_artifact(run_id, local_path, artifact_path)
        elif os.path.isdir(local_path):  # as the client does: the folder's name under ``artifact_path``
            name = os.path.basename(os.path.normpath(local_path))
            repo.log_artifacts(local_path, name if artifact_path is None else f"{artifact_path}/{name}")
        else:
            repo.log_artifact(local_path, artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        repo = self._repo(run_id)
        if repo is None:
            self.t.client.log_artifacts(run_id, local_dir, artifact_path)
        else:
            repo.log_artifacts(local_dir, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """The text as the file ``artifact_file`` (a path in the run's artifacts), written in a temporary folder
        under the tracker's experiment folder first."""
        with tempfile.TemporaryDirectory(prefix=".text-", dir=self.t.dir) as folder:
            path = Path(folder) / Path(artifact_file).name
            path.write_text(text, encoding="utf-8")
            self.log_artifact(run_id, str(path), os.path.dirname(artifact_file) or None)
