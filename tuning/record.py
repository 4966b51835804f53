"""The record of a search: what Tune saved of it, and the one place that reads it.

Each trial's ``result.json`` holds one JSON object per report: a single trial's epoch record, or a population
trial's (``tuning.population``). A retried or resumed trial reports again the epochs after its last checkpoint: the
record keeps each epoch's first report, and every view of it (MLflow's runs, the parent run's table, the plots) too.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.logger import JsonLoggerCallback

from tuning.population import section

__all__ = [
    "LostTrials",
    "ResultFile",
    "configuration_epochs",
    "configuration_records",
    "epoch_records",
    "reports",
    "result_file",
    "stamp_ms",
]


def result_file(trial: Any) -> Path:
    """A Tune trial's ``result.json``: the copy Tune's driver writes (its staging folder) if any, else the experiment's."""
    for folder in (getattr(trial, "local_path", None), getattr(trial, "path", None)):
        if folder and (Path(folder) / "result.json").is_file():
            return Path(folder) / "result.json"
    return Path(str(getattr(trial, "local_path", None) or getattr(trial, "path", ""))) / "result.json"


def reports(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ...]:
    """The reports of a ``result.json``, in order; none for a missing file. A line that is not a whole JSON object (the
    last line of a killed driver) is left out."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ()
    return _parsed(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _parsed(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    """Parsed once per version of the file: the members of a population each read the same file when they end."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict):
            out.append(report)
    return tuple(out)


def stamp_ms(report: dict[str, Any]) -> int:
    """When a report was made, in ms: Tune's own ``timestamp`` (seconds) of the result."""
    return int(report.get("timestamp", 0)) * 1000


def epoch_records(report: dict[str, Any], population: bool) -> dict[int | None, dict[str, Any]]:
    """The epoch record of each configuration in one report: {None: the report}, or {j: member j's record}."""
    if not population:
        return {None: report} if "epoch" in report else {}
    return {int(j): m for j, m in section(report, "members").items() if isinstance(m, dict) and "epoch" in m}


def configuration_records(
    all_reports: tuple[dict[str, Any], ...], member: int | None
) -> list[tuple[int, dict[str, Any]]]:
    """(report time in ms, record) of every report of one configuration (``member`` of a population, None for a
    single trial), repeated epochs included, in the order made."""
    out = []
    for report in all_reports:
        record = epoch_records(report, member is not None).get(member)
        if record is not None and isinstance(record.get("epoch"), int):
            out.append((stamp_ms(report), record))
    return out


def configuration_epochs(
    all_reports: tuple[dict[str, Any], ...], member: int | None, up_to: int | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """``configuration_records`` of each epoch up to ``up_to``, its first report only, in epoch order."""
    seen: dict[int, tuple[int, dict[str, Any]]] = {}
    for stamp, record in configuration_records(all_reports, member):
        if up_to is None or record["epoch"] <= up_to:
            seen.setdefault(record["epoch"], (stamp, record))
    return [seen[e] for e in sorted(seen)]


class LostTrials(Callback):
    """On resume, before Tune starts a trial: the folders of trials a killed driver started after Tune last wrote its
    state (so that the restored experiment does not know them) are removed; the searcher proposes those trials again
    (``StudySearcher``), under the same names, and they start afresh in clean folders."""

    def __init__(self, exp: str) -> None:
        self.exp = exp
        self.checked = False

    def __getstate__(self) -> dict[str, Any]:
        return {"exp": self.exp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.exp, self.checked = state["exp"], False

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self.checked:
            return
        self.checked = True
        known = {Path(str(t.path)).name for t in trials if getattr(t, "path", None)}
        for params in Path(self.exp).glob("*/params.json"):
            if params.parent.name not in known:
                shutil.rmtree(params.parent, ignore_errors=True)


class ResultFile(JsonLoggerCallback):
    """Tune's ``result.json`` writer, except that a retried trial keeps the rows the driver wrote. Before it appends a
    retried trial's rows, Tune copies the experiment folder's ``result.json`` over the driver's staging copy; that copy
    is uploaded by a background sync that rewrites it in place, so a retry that reads it mid-upload loses its earlier
    rows (Ray 2.60: a node-loss test lost a trial's epochs 1 to 4 once). In a running driver the staging copy is the
    complete one; a restarted driver has none, and Tune's copy from the experiment folder is what it resumes from."""

    def log_trial_start(self, trial: Any) -> None:
        local = Path(str(trial.local_path)) / "result.json"
        try:
            kept = local.read_bytes()
        except OSError:
            kept = b""
        super().log_trial_start(trial)  # may copy the experiment folder's result.json over ``local``
        if len(kept) > local.stat().st_size:
            with open(local, "r+b") as f:  # in place: Tune's handle appends at the end
                f.write(kept)
                f.truncate()
