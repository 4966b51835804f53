"""A run's full per-epoch record as a Parquet artifact, ``epochs.parquet``.

A search that logs only its key per-epoch metrics to MLflow (``epoch_metrics: key``, for population searches on
many GPUs, where the tracking server is the limit) still gives every run its whole record: one row per epoch, one
column per value the trial reported (validation figures, losses, speed). It is read from Tune's ``result.json``
of the trial when the run ends, each epoch as first reported (a retried or resumed trial reports again the
epochs after its last checkpoint; MLflow keeps the first, and so does this table).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["EPOCHS_FILE", "epoch_rows", "log_epochs"]

EPOCHS_FILE = "epochs.parquet"


def epoch_rows(result_file: str | Path, member: int | None, prefixes: tuple[str, ...]) -> list[dict[str, float]]:
    """Per epoch, in order, the numeric values whose key starts with one of ``prefixes`` (and ``epoch``) of a
    trial's results (``member`` j: of ``members/<j>`` in a population's results). Lines that are not whole JSON
    objects (the last line of a killed driver) are skipped; a missing file has no rows."""
    rows: dict[int, dict[str, float]] = {}
    try:
        st = os.stat(result_file)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for result in _results(str(result_file), st.st_mtime_ns, st.st_size):
        record: Any = result if member is None else (result.get("members") or {}).get(str(member))
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int) or record["epoch"] in rows:
            continue
        rows[record["epoch"]] = {
            k: float(v)
            for k, v in record.items()
            if (k == "epoch" or k.startswith(prefixes)) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return [rows[e] for e in sorted(rows)]


@functools.lru_cache(maxsize=4)
def _results(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    """The JSON objects of a ``result.json``, parsed once per version of the file: a population's members each
    read the same file when their runs end (16 parses of up to megabytes otherwise)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict):
            out.append(result)
    return tuple(out)


def log_epochs(
    client: Any, run_id: str, result_file: str, member: int | None, prefixes: list[str], scratch: Path
) -> None:
    """Log ``epochs.parquet`` (``epoch_rows``) on the run with ``client.log_artifact`` (an ``MlflowClient``, or
    ``Tracker.artifacts``, which skips the client's look-up of the run); nothing when the trial reported no epoch. The
    file is written in a temporary folder under ``scratch`` and removed once logged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = epoch_rows(result_file, member, tuple(prefixes))
    if not rows:
        return
    columns = ["epoch", *sorted({k for r in rows for k in r} - {"epoch"})]
    table = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.float64()) for c in columns})
    table = table.set_column(0, "epoch", pa.array([int(r["epoch"]) for r in rows], type=pa.int64()))
    folder = Path(tempfile.mkdtemp(prefix=".epochs-", dir=scratch))
    try:
        pq.write_table(table, folder / EPOCHS_FILE)
        client.log_artifact(run_id, str(folder / EPOCHS_FILE))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
