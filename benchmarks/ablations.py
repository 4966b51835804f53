"""DEDN vs ESZSL vs the paper's table-3 ablations on the semi-synthetic CUB, SUN and AWA2 stores.

Every row runs the honest protocol of ``dedn train``: epoch and inference grid point chosen on the
validation task, retrain on trainval, test once. Stores are built from the real benchmark files
(../shared/data/zsl) with planted features at CPU size.

    python benchmarks/ablations.py                          # C=32, 7x7, 10 epochs, lr 3e-4, all three datasets
    python benchmarks/ablations.py --datasets CUB --epochs 10 --channels 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT

from dedn.baselines import eszsl_protocol
from dedn.config import load_config
from dedn.data import open_store
from dedn.data.synth import SynthConfig, synth_from_benchmark
from dedn.train import fit_and_test

ROWS = [  # (label, overrides); the default squared-error term is the mean (loss.distance=mse)
    ("DEDN (full)", ["ablation=none"]),
    ("DEDN, summed square", ["ablation=none", "loss.distance=sum"]),  # the default before the mean
    ("cExp w/o L_distill", ["ablation=cexp_only"]),
    ("fExp w/o L_distill", ["ablation=fexp_only"]),
    ("DEDN w/o L_distill", ["ablation=no_distill"]),
    ("DAN w/o CA", ["ablation=no_channel_attention"]),
    ("DEDN w/o L_mal", ["ablation=no_mal"]),
    ("DAN w/o L_align", ["ablation=no_align"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["CUB", "SUN", "AWA2"])
    ap.add_argument("--zsl", type=Path, default=ROOT.parent / "shared" / "data" / "zsl")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dedn-ablations"))
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rows", nargs="+", default=None, help="only the settings whose label contains one of these")
    a = ap.parse_args()
    lines: list[tuple[str, str, float, float, float, float, float, float]] = []
    for ds in a.datasets:
        store = a.work / f"synth-{ds}-{a.channels}x{a.size}"
        if not store.exists():
            synth_from_benchmark(a.zsl / ds, store, SynthConfig(channels=a.channels, height=a.size, width=a.size))
        s = open_store(store)
        e = eszsl_protocol(s)
        lines.append((ds, "ESZSL", e.val["H"], e.test["U"], e.test["S"], e.test["H"], e.test["T"], 0.0))
        for name, sets in ROWS:
            if a.rows and not any(r in name for r in a.rows):
                continue
            t = time.perf_counter()
            cfg = load_config(
                ROOT / "configs" / f"{ds.lower()}.yaml",
                [
                    f"data.store={store}",
                    f"optim.epochs={a.epochs}",
                    f"optim.lr={a.lr}",
                    "device=cpu",
                    *sets,
                    "paper_protocol=false",
                ],
            )
            r = fit_and_test(cfg, s)
            assert r.test_grid_point is not None
            m = r.test_grid_point
            lines.append(
                (ds, name, r.validation.best_grid["H"], m["U"], m["S"], m["H"], m["T"], time.perf_counter() - t)
            )
            print(f"row {ds:<6} {name:<22} " + " ".join(f"{100 * v:>6.1f}" for v in lines[-1][2:7]), flush=True)
    print(
        f"\nSemi-synthetic stores C={a.channels} {a.size}x{a.size}, {a.epochs} epochs, lr {a.lr}, CPU; "
        "validation-chosen epoch and (lambda_rc, lambda_e, c); test scored once (%)"
    )
    print(
        f"{'dataset':<6} {'setting':<22} {'val H':>6} {'test U':>7} {'test S':>7} {'test H':>7} {'test T':>7} {'s':>6}"
    )
    for ds, name, vh, u, s_, h, t, sec in lines:
        print(
            f"{ds:<6} {name:<22} {100 * vh:>6.1f} {100 * u:>7.1f} {100 * s_:>7.1f} {100 * h:>7.1f} {100 * t:>7.1f} "
            f"{sec:>6.0f}"
        )
    for ds in a.datasets:
        h = {name: th for d, name, _, _, _, th, _, _ in lines if d == ds}
        if h.get("DEDN w/o L_distill") and "DEDN (full)" in h and "DEDN, summed square" in h:
            print(
                f"{ds}: full DEDN test H / no-distillation test H = "
                f"{h['DEDN (full)'] / h['DEDN w/o L_distill']:.2f} (summed square: "
                f"{h['DEDN, summed square'] / h['DEDN w/o L_distill']:.2f})"
            )
    print(f"(python benchmarks/ablations.py --channels {a.channels} --size {a.size} --epochs {a.epochs} --lr {a.lr})")


if __name__ == "__main__":
    main()
