"""Where the time of a small search goes, and what cutting the per-trial overhead buys: the quick-start
search (configs/search/tiny.yaml on the built-in store) run several ways, one after the other, in one run.

Modes:
- ``fresh``: a new worker process per trial (``reuse_actors: false``), one configuration per trial;
- ``reuse``: finished trials' worker processes run the next trials (``reuse_actors: true``, as the
  quick-start spec sets);
- ``population``: as ``reuse``, with 4 configurations per trial (``--population 4``), members halved.

For each mode the table splits the command's wall time into its phases (Ray start, store put, trials,
final retrain + test, MLflow summary and plots, Ray stop), and the trials' slot time into training
(each epoch's ``epoch_seconds``: train + validation scoring) and per-trial overhead (each trial
function's time from its start to its last report minus its training: imports, store view, model
build, checkpoints, reports).

    python benchmarks/search_overhead.py                        # 8 configurations, all three modes
    python benchmarks/search_overhead.py --trials 16 --modes reuse population --no-tracking
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import ROOT

MODES = {
    "fresh": {"reuse_actors": False},
    "reuse": {"reuse_actors": True},
    "population": {"reuse_actors": True, "population": {"size": 4, "grace_period": 2, "reduction_factor": 2}},
}


def run_mode(mode: str, tmp: Path, trials: int, track: bool) -> dict[str, Any]:
    from tuning.search import SearchOptions, run_search

    spec = yaml.safe_load((ROOT / "configs" / "search" / "tiny.yaml").read_text())
    spec.update(MODES[mode])
    spec["base"] = str(ROOT / "configs" / "tiny.yaml")
    spec_path = tmp / f"{mode}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = run_search(
        SearchOptions(
            spec_path=str(spec_path),
            store=str(tmp / "tiny"),
            name=mode,
            storage_path=str(tmp / "runs"),
            num_samples=trials,
            track=track,
            tracking_uri=f"sqlite:///{tmp / f'{mode}.db'}",
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
    return {
        "tune_trials": out.num_trials,
        "epochs": epochs,
        "train": train_s,
        "slot": slot_s,
        "wall": out.seconds,
        "phases": out.phases or {},
        "best_val_H": out.best_metrics["val_H"],
    }


def main() -> None:
    from dedn.data.synth import synth_builtin

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8, help="configurations per search")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--no-tracking", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dedn-overhead-"))
    synth_builtin(tmp / "tiny")
    import mlflow  # noqa: F401  one-time imports before the first mode, so no mode pays them
    import optuna  # noqa: F401
    import ray.tune  # noqa: F401

    got = {m: run_mode(m, tmp, a.trials, not a.no_tracking) for m in a.modes}

    print(
        f"\nQuick-start search, {a.trials} configurations, 2 concurrent trials, tracking "
        f"{'off' if a.no_tracking else 'on'}, CPU (seconds)"
    )
    names = list(got)
    print(f"{'':<46}" + "".join(f"{m:>12}" for m in names))

    def row(label: str, values: list[float], fmt: str = "{:>12.1f}") -> None:
        print(f"{label:<46}" + "".join(fmt.format(v) for v in values))

    row("Tune trials", [got[m]["tune_trials"] for m in names], "{:>12d}")
    row("epochs trained (all trials)", [got[m]["epochs"] for m in names], "{:>12d}")
    phases = [p for p in got[names[0]]["phases"]]
    for p in phases:
        row(f"  {p}", [got[m]["phases"].get(p, 0.0) for m in names])
    row("wall time of the command", [got[m]["wall"] for m in names])
    row("trial slot time (sum over trials)", [got[m]["slot"] for m in names])
    row("  training + validation scoring", [got[m]["train"] for m in names])
    row("  per-trial overhead", [got[m]["slot"] - got[m]["train"] for m in names])
    row(
        "per-trial overhead / trial slot time (%)",
        [100 * (got[m]["slot"] - got[m]["train"]) / max(got[m]["slot"], 1e-9) for m in names],
        "{:>11.0f}%",
    )
    row(
        "overhead per Tune trial",
        [(got[m]["slot"] - got[m]["train"]) / max(got[m]["tune_trials"], 1) for m in names],
        "{:>12.2f}",
    )
    row("training share of wall time (%)", [100 * got[m]["train"] / got[m]["wall"] for m in names], "{:>11.0f}%")
    row("best validation H", [got[m]["best_val_H"] for m in names], "{:>12.3f}")
    print(
        f"(python benchmarks/search_overhead.py --trials {a.trials} --modes {' '.join(a.modes)}"
        f"{' --no-tracking' if a.no_tracking else ''})"
    )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
