"""Where the time of a small search goes: Ray start-up, per-trial overhead (scheduling, worker start,
object-store read, checkpoints, tracking) and the training itself.

Runs the quick-start search (configs/search/tiny.yaml on the built-in store) and splits its wall time:
- training: the sum over trials of each epoch's ``epoch_seconds`` (train + validation scoring);
- in-trial overhead: each trial function's time from its start to its last report (Tune's
  ``time_total_s``: store view from the object store, model build, checkpoints, reports) minus training;
- outside trial functions: wall time minus trial time over the 2 concurrent slots (Ray start/stop,
  worker processes, scheduling, store put, searcher, final retrain + test, MLflow plots).

    python benchmarks/search_overhead.py                 # 8 trials, tracking on
    python benchmarks/search_overhead.py --trials 16 --no-tracking
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from dedn.data.synth import synth_builtin
    from tuning.search import SearchOptions, run_search

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--no-tracking", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dedn-overhead-"))
    synth_builtin(tmp / "tiny")
    out = run_search(
        SearchOptions(
            spec_path=str(ROOT / "configs" / "search" / "tiny.yaml"),
            store=str(tmp / "tiny"),
            name="overhead",
            storage_path=str(tmp / "runs"),
            num_samples=a.trials,
            track=not a.no_tracking,
            tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        )
    )
    train_s, slot_s, epochs = 0.0, 0.0, 0
    for f in out.experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        train_s += sum(r["epoch_seconds"] for r in rows)
        slot_s += rows[-1]["time_total_s"]  # trial function start (incl. its setup) -> last report
        epochs += len(rows)
    n = out.num_trials
    print(
        f"\nQuick-start search: {n} trials ({epochs} epochs in all, ASHA), 2 concurrent, tracking "
        f"{'off' if a.no_tracking else 'on'}, CPU"
    )
    print(f"{'part':<44} {'seconds':>8} {'share':>7}")
    rows_ = [
        ("training + validation scoring (sum over trials)", train_s),
        ("per-trial overhead inside trial slots (sum)", slot_s - train_s),
    ]
    for name, v in rows_:
        print(f"{name:<44} {v:>8.1f} {100 * v / max(slot_s, 1e-9):>6.0f}%")
    print(f"{'trial slot-seconds (sum)':<44} {slot_s:>8.1f}")
    rest = out.seconds - slot_s / 2
    print(f"{'wall time of the whole command':<44} {out.seconds:>8.1f}")
    print(
        f"{'  of which outside trial functions':<44} {rest:>8.1f} {100 * rest / out.seconds:>6.0f}%   "
        "(Ray start/stop, worker start, scheduling, store put, final retrain + test, plots)"
    )
    print(
        f"per trial: {train_s / n:.2f} s training, {(slot_s - train_s) / n:.2f} s overhead in the trial; "
        f"wall per trial {out.seconds / n:.2f} s (2 trials at a time, plus driver start-up and the final test)"
    )
    print(f"(python benchmarks/search_overhead.py --trials {a.trials}{' --no-tracking' if a.no_tracking else ''})")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
