"""GPU check: agreement with the CPU on a fixed batch, then training-step throughput at CUB shapes.

One script, a few minutes on one GPU. It prints two tables:

1. Agreement on one fixed batch (seeded): branch outputs, loss and gradients of the device run against a
   float32 CPU run of the same weights, in float32 and in bf16 autocast; a population member against
   the single model of the same weights on the device.
2. Throughput at C=2048, 14x14, D=312 (CUB manual clusters, Q=6), K=200, B=50, G=300: ms/step,
   samples/s (member-samples/s for populations) and peak device memory, for
   - a per-subnetwork implementation written the way the released code is (one module per DAN, features
     kept on the host and copied to the device every batch, float32);
   - the single-configuration trainer's step (features resident on the device; float32, bf16 autocast,
     and optionally torch.compile);
   - populations of M = 8, 16, 32 configurations trained as one batched model (bf16 autocast).
   Each step is the trainer's own forward-and-loss function (dedn.build.build_step,
   the same with per-member weights), backward, and the optimiser step.

Targets on one H100/H200: single configuration <= 10 ms/step; population >= 25,000 member-samples/s.

    python benchmarks/gpu_check.py                 # on a GPU (CUB shapes)
    python benchmarks/gpu_check.py --compile       # also torch.compile the single-configuration step
    python benchmarks/gpu_check.py --small         # CPU smoke run at small shapes (no GPU needed)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT


def build(channels: int, regions: int, classes: int, members: int, seed: int = 0) -> tuple[Any, ...]:
    from dedn.model import DEDN, ModelConfig
    from dedn.partitions import manual_preset

    _, ids = manual_preset("CUB")
    g = torch.Generator().manual_seed(seed)
    vec, att = torch.randn(ids.size, 300, generator=g), torch.rand(classes, ids.size, generator=g)
    models = []
    for j in range(members):
        m = DEDN(
            ModelConfig(partition=tuple(int(i) for i in ids)),
            vec,
            att,
            channels=channels,
            regions=regions,
            generator=torch.Generator().manual_seed(seed + j),
        )
        for e in m.experts:  # non-zero attention weights, so every product does real work
            torch.nn.init.normal_(e.w2, std=0.1, generator=g)
            if hasattr(e, "w4"):
                torch.nn.init.normal_(e.w4, std=0.1, generator=g)
        models.append(m)
    return models, ids


def masks(classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    seen = torch.arange(classes, device=device) < classes * 3 // 4
    return seen, ~seen


def single_step(model: Any, device: torch.device, classes: int, bf16: bool, compile_: bool) -> Callable[..., Any]:
    from dedn.build import build_step
    from dedn.config import LossConfig
    from dedn.device import compiled

    seen, unseen = masks(classes, device)
    fl = compiled(build_step(model, LossConfig(), seen, unseen, bf16), compile_)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss, _ = fl(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def population_step(models: list[Any], device: torch.device, classes: int, bf16: bool) -> Callable[..., Any]:
    from dedn.build import build_step
    from dedn.config import LossConfig
    from dedn.population_model import PopulationDEDN, PopulationRMSprop

    pop = PopulationDEDN(models).to(device)
    m = len(models)
    hyper = {
        k: torch.full((m,), v, device=device)
        for k, v in {"beta": 1e-3, "gamma": 0.1, "eps": 1.0, "calibration": 1.0}.items()
    }
    seen, unseen = masks(classes, device)
    fl = build_step(pop, LossConfig(), seen, unseen, bf16, hyper)
    lrs = list(np.geomspace(1e-4, 1e-2, m))
    opt = PopulationRMSprop(dict(pop.named_parameters()), pop.member_of(), lrs, [0.9] * m, [1e-4] * m)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        losses, _ = fl(x, y)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()

    return step


def naive_step(model: Any, device: torch.device, classes: int) -> Callable[..., Any]:
    sys_path_benchmarks()
    from train_throughput import SubnetDEDN, _step_fn  # type: ignore[import-not-found]

    net = SubnetDEDN(model).to(device)
    seen, _ = masks(classes, device)
    from dedn.config import LossConfig

    return _step_fn(net, False, model.class_attributes.to(device), seen, LossConfig())  # type: ignore[no-any-return]


def sys_path_benchmarks() -> None:
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(a: argparse.Namespace, device: torch.device) -> list[tuple[str, float, float]]:
    """(check, max relative difference, tolerance) rows."""
    from dedn.config import LossConfig
    from dedn.losses import dedn_loss
    from dedn.model import Branches
    from dedn.population_model import PopulationDEDN

    models, _ = build(a.channels, a.size * a.size, a.classes, 2)
    ref = models[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, a.channels, a.size, a.size, generator=g)
    y = torch.randint(0, a.classes * 3 // 4, (a.batch,), generator=g)

    def run(model: Any, dev: torch.device, bf16: bool) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        m = model.to(dev)
        m.zero_grad(set_to_none=True)
        seen, unseen = masks(a.classes, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            br = m(x.to(dev))
        br = Branches(*(b.float() for b in br))
        p_ec, p_ef = m.scores(br)
        loss, _ = dedn_loss(br, p_ec, p_ef, y.to(dev), seen, unseen, LossConfig())
        loss.backward()
        out = ([b.detach().cpu() for b in br], loss.detach().cpu(), [p.grad.detach().cpu() for p in m.parameters()])
        m.to("cpu")
        return out

    def rel(u: list[torch.Tensor] | torch.Tensor, v: list[torch.Tensor] | torch.Tensor) -> float:
        us, vs = (u, v) if isinstance(u, list) else ([u], [v])
        assert isinstance(vs, list)
        return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-12)) for p, q in zip(us, vs, strict=True))

    cpu = run(ref, torch.device("cpu"), False)
    rows = []
    dev32 = run(ref, device, False)
    rows += [
        ("float32 branch outputs O_r, O_c", rel(dev32[0], cpu[0]), 1e-4),
        ("float32 loss", rel(dev32[1], cpu[1]), 1e-4),
        ("float32 gradients", rel(dev32[2], cpu[2]), 1e-3),
    ]
    bf16_ok = device.type == "cuda" or a.cpu_bf16
    if bf16_ok:
        dev16 = run(ref, device, True)
        rows += [
            ("bf16 autocast branch outputs", rel(dev16[0], cpu[0]), 5e-2),
            ("bf16 autocast loss", rel(dev16[1], cpu[1]), 2e-2),
            ("bf16 autocast gradients", rel(dev16[2], cpu[2]), 1e-1),
        ]
    pop = PopulationDEDN(models).to(device)
    with torch.no_grad():
        got = pop(x.to(device))
    single1 = run(models[1], device, False)[0]
    rows.append(("population member 1 vs its single model (fp32)", rel([b[:, 1].cpu() for b in got], single1), 1e-4))
    return rows


def throughput(a: argparse.Namespace, device: torch.device) -> list[tuple[str, int, float, float, float]]:
    """(implementation, members, ms/step, member-samples/s, peak device MB) rows."""
    from dedn.feeding import FeatureSource

    r = a.size * a.size
    rng = np.random.default_rng(0)
    host = rng.standard_normal((a.images, a.channels, a.size, a.size), dtype=np.float32).astype(np.float16)
    labels = torch.as_tensor(rng.integers(0, a.classes * 3 // 4, a.images))
    resident = FeatureSource(host, device) if device.type == "cuda" else None
    batches = [rng.choice(a.images, a.batch, replace=False) for _ in range(a.warmup + a.steps)]
    rows: list[tuple[str, int, float, float, float]] = []

    def time_it(name: str, members: int, make: Callable[[], Callable[..., Any]], on_host: bool) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step = make()

            # as the trainer does: on a GPU the epoch's indices and targets are on the device before the steps
            on_device = [] if resident is None else resident.epoch_indices(batches, labels)

            def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                rows_ = batches[i]
                if on_host or resident is None:  # the released code: index on the host, copy each batch
                    return torch.from_numpy(host[rows_].astype(np.float32)).to(device), labels[rows_].to(device)
                idx, y = on_device[i]
                return resident.batch(idx), y

            for i in range(a.warmup):
                step(*batch(i))
            sync(device)
            t = time.perf_counter()
            for i in range(a.warmup, len(batches)):
                step(*batch(i))
            sync(device)
            ms = 1000 * (time.perf_counter() - t) / a.steps
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            rows.append((name, members, ms, members * a.batch * 1000 / ms, peak))
        except torch.OutOfMemoryError:
            rows.append((name + " (out of memory)", members, float("nan"), float("nan"), float("nan")))
        print(f"  timed {name}", flush=True)

    def one() -> Any:
        return build(a.channels, r, a.classes, 1)[0][0].to(device)

    time_it("per-subnetwork, released style (fp32, host copy)", 1, lambda: naive_step(one(), device, a.classes), True)
    time_it("single configuration, fp32", 1, lambda: single_step(one(), device, a.classes, False, False), False)
    bf16 = device.type == "cuda" or a.cpu_bf16
    if bf16:
        time_it(
            "single configuration, bf16 autocast", 1, lambda: single_step(one(), device, a.classes, True, False), False
        )
    if a.compile:
        time_it(
            f"single configuration, {'bf16 + ' if bf16 else ''}torch.compile",
            1,
            lambda: single_step(one(), device, a.classes, bf16, True),
            False,
        )
    for m in a.members:
        time_it(
            f"population, {'bf16 autocast' if bf16 else 'fp32'}",
            m,
            lambda m=m: population_step(build(a.channels, r, a.classes, m)[0], device, a.classes, bf16),
            False,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small shapes, CPU allowed: a smoke run of this script")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd single step")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--members", type=int, nargs="*", default=None)
    a = ap.parse_args()
    from dedn.device import cpu_supports_bf16

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not a.small:
        raise SystemExit("error: no GPU here; run with --small for the CPU smoke run")
    a.channels, a.size, a.classes, a.batch = (64, 7, 200, 50) if a.small else (2048, 14, 200, 50)
    a.images = 400 if a.small else 1000
    a.steps = a.steps or (5 if a.small else 20)
    a.warmup = 2 if a.small else 5
    a.members = a.members if a.members is not None else ([2, 4] if a.small else [8, 16, 32])
    a.cpu_bf16 = device.type == "cpu" and cpu_supports_bf16()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    t0 = time.perf_counter()
    print(
        f"device: {name}; torch {torch.__version__}; C={a.channels} {a.size}x{a.size} D=312 K={a.classes} B={a.batch}"
    )

    print("\n1. Agreement with a float32 CPU run on one fixed batch (max |diff| / max |reference|)")
    print(f"{'check':<50} {'rel diff':>10} {'tolerance':>10} {'ok':>4}")
    for check, diff, tol in agreement(a, device):
        print(f"{check:<50} {diff:>10.2e} {tol:>10.0e} {'yes' if diff <= tol else 'NO':>4}")

    print(f"\n2. Training step throughput ({a.steps} timed steps after {a.warmup} warm-up)")
    rows = throughput(a, device)
    print(f"{'implementation':<52} {'M':>3} {'ms/step':>9} {'samples/s':>10} {'peak MB':>9} {'MB/member':>10}")
    for impl, m, ms, sps, peak in rows:
        print(f"{impl:<52} {m:>3} {ms:>9.1f} {sps:>10.0f} {peak:>9.0f} {peak / m:>10.0f}")
    naive = rows[0][2]
    single = min(r[2] for r in rows if r[1] == 1 and not r[0].startswith("per-subnetwork"))
    best_pop = max((r[3] for r in rows if r[1] > 1), default=float("nan"))
    print(f"\nsingle configuration: {single:.1f} ms/step, {naive / single:.1f}x the released-style step")
    if not a.small:
        print(f"target single <= 10 ms/step: {'met' if single <= 10 else 'NOT met'}")
        print(
            f"target population >= 25,000 member-samples/s: {'met' if best_pop >= 25000 else 'NOT met'} ({best_pop:.0f})"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"(python benchmarks/gpu_check.py{' --small' if a.small else ''}{' --compile' if a.compile else ''})")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
