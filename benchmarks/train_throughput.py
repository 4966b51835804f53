"""Training throughput: the fused DEDN against a per-subnetwork implementation, side by side in one run.

The per-subnetwork model is written the way the released code is: one module per DAN (cExp plus one per
cluster), each computing its own V W F products over the batch, outputs concatenated in attribute
order; it is checked equal to the fused model before timing. Shapes default to CUB scaled to a
2-core CPU: C=256, 7x7, D=312 (manual 6 clusters), K=200, B=50, G=300.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --channels 2048 --size 14 --steps 5   # full CUB shapes
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import LossConfig
from dedn.losses import dedn_loss
from dedn.model import DEDN, ModelConfig
from dedn.partitions import manual_preset


class SubnetDAN(nn.Module):
    """One DAN, batched over images, its own weights (the released code's Snet/GNet module)."""

    def __init__(self, v: Tensor, w: list[Tensor]) -> None:
        super().__init__()
        self.v = nn.Parameter(v.clone())
        self.w1, self.w2, self.w3, self.w4 = (nn.Parameter(x.clone()) for x in w)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:  # f (B, C, R)
        s_r = torch.einsum("dg,gc,bcr->bdr", self.v, self.w1, f)  # (B, D_s, R)
        a_r = torch.softmax(torch.einsum("dg,gc,bcr->bdr", self.v, self.w2, f), dim=2)
        s_c = torch.einsum("dg,gr,bcr->bdc", self.v, self.w3, f)  # (B, D_s, C)
        a_c = torch.softmax(torch.einsum("dg,gr,bcr->bdc", self.v, self.w4, f), dim=2)
        return (s_r * a_r).sum(2), (s_c * a_c).sum(2)


class SubnetDEDN(nn.Module):
    """cExp + Q fExp DANs as separate modules, a Python loop over them."""

    def __init__(self, fused: DEDN) -> None:
        super().__init__()
        ids = np.asarray(fused.cfg.partition)
        self.groups = [torch.as_tensor(np.flatnonzero(ids == q)) for q in range(fused.cfg.num_clusters)]
        ce, fe = fused.cexp, fused.fexp
        assert ce is not None and fe is not None
        self.cexp = SubnetDAN(
            ce.v.detach(), [ce.w1[0].detach(), ce.w2[0].detach(), ce.w3[0].detach(), ce.w4[0].detach()]
        )
        self.fexp = nn.ModuleList(
            SubnetDAN(fe.v.detach()[g], [fe.w1[q].detach(), fe.w2[q].detach(), fe.w3[q].detach(), fe.w4[q].detach()])
            for q, g in enumerate(self.groups)
        )
        self.d = ids.size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        f = F.normalize(x.flatten(2), dim=1)
        cr, cc = self.cexp(f)
        fr = f.new_zeros(f.shape[0], self.d)
        fc = f.new_zeros(f.shape[0], self.d)
        for g, dan in zip(self.groups, self.fexp, strict=True):
            r, c = dan(f)
            fr[:, g], fc[:, g] = r, c
        return cr, cc, fr, fc


def _step_fn(
    model: nn.Module,
    fused: bool,
    att: Tensor,
    seen: Tensor,
    lcfg: LossConfig,
    bf16: bool = False,
    compile_: bool = False,
):  # type: ignore[no-untyped-def]
    """One training step. Fused: the trainer's own forward-and-loss (dedn.build.build_step), with
    bf16 autocast and torch.compile as the config's ``precision`` and ``compile`` set them."""
    from dedn.build import build_step
    from dedn.device import compiled

    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    forward_loss = compiled(build_step(model, lcfg, seen, ~seen, bf16), compile_) if fused else None  # type: ignore[arg-type]

    def step(x: Tensor, y: Tensor) -> None:
        if forward_loss is not None:
            loss, _ = forward_loss(x, y)
        else:
            from dedn.model import Branches

            br = Branches(*model(x))
            p_ec, p_ef = (br.cexp_r + br.cexp_c) @ att.T, (br.fexp_r + br.fexp_c) @ att.T
            loss, _ = dedn_loss(br, p_ec, p_ef, y, seen, ~seen, lcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _population_step(fused: DEDN, m: int, seen: Tensor, lcfg: LossConfig):  # type: ignore[no-untyped-def]
    """M copies of ``fused`` (learning rates 1e-4 .. 1e-2) trained as one population, as dedn.population does."""
    from dedn.build import build_step
    from dedn.population_model import PopulationDEDN, PopulationRMSprop

    pop = PopulationDEDN([fused] * m)
    hyper = {
        k: torch.full((m,), float(getattr(lcfg, k)))
        for k in ("beta", "gamma", "eps", "calibration")  # lambda_cal 0: off
    }
    fl = build_step(pop, lcfg, seen, ~seen, False, hyper)
    lrs = [float(x) for x in np.geomspace(1e-4, 1e-2, m)]
    opt = PopulationRMSprop(dict(pop.named_parameters()), pop.member_of(), lrs, [0.9] * m, [1e-4] * m)

    def step(x: Tensor, y: Tensor) -> None:
        losses, _ = fl(x, y)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()

    return step


def main() -> None:
    """Parse the options, measure every row, print the table. Over 80 lines on purpose: a benchmark's main
    is one straight script, so each printed row sits next to the code that measured it."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=7)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it compiles first)")
    ap.add_argument("--members", type=int, nargs="*", default=[4], help="population sizes to time (fp32)")
    a = ap.parse_args()
    from dedn.device import cpu_supports_bf16

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    _, ids = manual_preset("CUB")
    d, g, r = ids.size, 300, a.size * a.size
    vec, att = torch.randn(d, g), torch.rand(a.classes, d)
    fused = DEDN(ModelConfig(partition=tuple(ids)), vec, att, channels=a.channels, regions=r)
    for e in fused.experts:  # non-zero attention weights so both implementations do the same work
        nn.init.normal_(e.w2, std=0.1)
        nn.init.normal_(e.w4, std=0.1)
    naive = SubnetDEDN(fused)
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    y = torch.randint(0, a.classes * 3 // 4, (a.batch,))
    seen = torch.arange(a.classes) < a.classes * 3 // 4
    with torch.no_grad():
        got, ref = fused(x), naive(x)
        err = max(float((u - v).abs().max()) for u, v in zip(got, ref, strict=True) if u is not None)
    lcfg = LossConfig()
    att_n = fused.class_attributes
    bf16 = cpu_supports_bf16()

    models: dict[str, DEDN] = {}

    def copy(name: str) -> DEDN:  # the same starting weights for every fused row
        m = DEDN(ModelConfig(partition=tuple(ids)), vec, att, channels=a.channels, regions=r)
        m.load_state_dict(fused.state_dict())
        models[name] = m
        return m

    steps = {
        "per-subnetwork (released layout), fp32": _step_fn(naive, False, att_n, seen, lcfg),
        "fused, fp32": _step_fn(copy("fused, fp32"), True, att_n, seen, lcfg),
    }
    if bf16:
        name = "fused, bf16 autocast"
        steps[name] = _step_fn(copy(name), True, att_n, seen, lcfg, bf16=True)
        if not a.no_compile:
            name = "fused, bf16 autocast + torch.compile"
            steps[name] = _step_fn(copy(name), True, att_n, seen, lcfg, True, True)
    elif not a.no_compile:
        name = "fused, fp32 + torch.compile"
        steps[name] = _step_fn(copy(name), True, att_n, seen, lcfg, compile_=True)
    batch_of: dict[str, int] = {k: a.batch for k in steps}  # member-samples per step
    for m in a.members:
        name = f"population of {m}, fp32 (per member)"
        steps[name] = _population_step(fused, m, seen, lcfg)
        batch_of[name] = a.batch * m
    first: dict[str, float] = {}
    for name, fn in steps.items():  # warm-up, which includes compiling
        t = time.perf_counter()
        fn(x, y)
        first[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.steps):  # interleaved, so load on the shared machine hits all alike
        for name, fn in steps.items():
            t = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - t)
    # After the same 1 + steps updates: each fused row's outputs and loss on a held-out batch against fp32.
    x2 = torch.randn(a.batch, a.channels, a.size, a.size)
    y2 = torch.randint(0, a.classes * 3 // 4, (a.batch,))
    outs = {}
    with torch.no_grad():
        for name, m in models.items():
            br = m(x2)
            p_ec, p_ef = m.scores(br)
            outs[name] = (br, float(dedn_loss(br, p_ec, p_ef, y2, seen, ~seen, lcfg)[0]))
    ref_br, ref_loss = outs["fused, fp32"]

    def rel(name: str) -> str:
        if name not in outs:
            return f"{'-':>10} {'-':>10}"
        br, loss = outs[name]
        d = max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(br, ref_br, strict=True) if v is not None)
        return f"{d:>10.1e} {abs(loss - ref_loss) / abs(ref_loss):>10.1e}"

    print(
        f"\nDEDN training step, CPU, {torch.get_num_threads()} threads: C={a.channels} {a.size}x{a.size} "
        f"D={d} (Q=6) K={a.classes} B={a.batch} G={g}; max |fused - per-subnetwork| forward = {err:.1e}"
    )
    print(
        f"native bf16 on this CPU: {bf16}. 'first s': the first step, compiling included. 'branches' and 'loss': "
        f"after {a.steps + 1} steps, relative difference from the fp32 fused model on a held-out batch"
    )
    print(
        f"{'implementation':<40} {'ms/step':>8} {'samples/s':>10} {'vs naive':>9} {'first s':>8} "
        f"{'branches':>10} {'loss':>10}"
    )
    med = {k: float(np.median(v)) for k, v in times.items()}
    naive_ms = next(iter(med.values()))
    for name, m in med.items():
        per = m * a.batch / batch_of[name]  # population rows: the step time per member
        print(
            f"{name:<40} {1000 * per:>8.1f} {a.batch / per:>10.0f} {naive_ms / per:>8.2f}x {first[name]:>8.1f} "
            f"{rel(name)}"
        )
    print("(population rows: step time / M and member-samples/s; members differ in learning rate, 1e-4 to 1e-2)")
    print(f"(python benchmarks/train_throughput.py --channels {a.channels} --size {a.size} --steps {a.steps})")


if __name__ == "__main__":
    main()
