"""Population training: M DEDN configurations trained as one batched model on a shared minibatch stream.

A DEDN step at the paper's batch size (50) leaves a large GPU mostly idle; stacking M configurations
into one model fills it. Every member keeps its own weights, its own loss hyperparameters (beta, gamma,
eps, lambda_cal, calibration), attribute partition, learning rate, momentum, weight decay and seed (the
seed initialises its weights); members share the batch size, the epochs, the architecture switches and
the minibatch stream. The fused matrices of all members are stacked, so each branch is still one
GEMM: (B, R, C) @ (C, 2 E M D) for the region branch. Features are read once per step for all members.

Each member is numerically the training of its configuration alone on the same minibatch stream
(``dedn.train.train(cfg, ..., batch_seed=...)``): its rows of every product and its slice of every
parameter and optimiser state depend only on its own weights. tests/test_population.py checks this.

Successive halving (``Halving``): members are ranked at rung epochs grace, grace*eta, grace*eta^2, ...
(before the last epoch) by their best validation H so far; the top ceil(n/eta) (at least
``min_members``) go on, the others stop and are cut out of the stacked matrices and the optimiser
state, so every later step costs less. A member whose loss turns non-finite stops as failed; the
others go on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dedn.config import TrainConfig
from dedn.data.store import FeatureStore
from dedn.errors import DednInputError
from dedn.inference import branch_outputs
from dedn.losses import cross_entropy_loss, margin_aware_loss, pair_distance, self_calibration_loss
from dedn.model import (
    DEDN,
    Branches,
    ExpertWeights,
    calibration_signs,
    class_scores,
    expert_branches,
    flatten_features,
)
from dedn.train import (
    EpochRecord,
    FeatureSource,
    TrainResult,
    build_model,
    check_compatible,
    compiled,
    epoch_batches,
    evaluate_branches,
    loss_config,
    make_task,
    resolve_device,
    resolve_partition,
    use_bf16,
)

# Settings every member must share: they shape the batched model or the minibatch stream.
SHARED_FIELDS = (
    "model.use_cexp",
    "model.use_fexp",
    "model.channel_attention",
    "model.normalize_features",
    "model.low_rank_hidden",
    "loss.mal",
    "loss.fidelity",
    "loss.distance",
    "loss.mal_variant",
    "optim.batch_size",
    "optim.epochs",
    "optim.balanced",
    "device",
    "precision",
    "eval_batch_size",
)
PER_MEMBER_LOSS = ("beta", "gamma", "eps", "lambda_cal", "calibration")
PER_MEMBER_OPTIM = ("lr", "momentum", "weight_decay")


def _field(cfg: TrainConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_members(cfgs: list[TrainConfig], source: str = "population") -> None:
    """Refuse members that cannot share one batched model: one line naming the first differing field."""
    if not cfgs:
        raise DednInputError(source, "members", "a population needs at least one member, got none")
    for name in SHARED_FIELDS:
        first = _field(cfgs[0], name)
        for j, c in enumerate(cfgs[1:], start=1):
            if _field(c, name) != first:
                raise DednInputError(
                    source,
                    name,
                    f"must be the same for every member of a population (member 0: {first!r}, member {j}: "
                    f"{_field(c, name)!r}); search it with --population 1",
                )


class PopulationDEDN(nn.Module):
    """M single-configuration DEDN models stacked: each expert is one ``ExpertWeights`` over M*D rows.

    cExp: M DANs of D rows (DAN m = member m). fExp: one DAN per (member, cluster), member-major, padded
    to the largest cluster of any member. ``v`` rows are member-major: rows m*D .. m*D + D - 1 are member
    m's attribute rows. forward(features (B, C, H, W)) -> Branches of (B, M, D).
    """

    class_attributes: Tensor  # (K, D) buffer, shared by all members

    def __init__(self, models: list[DEDN]) -> None:
        super().__init__()
        if not models:
            raise DednInputError("population", "members", "a population needs at least one member, got none")
        first = models[0]
        for m in models[1:]:
            if (m.channels, m.regions) != (first.channels, first.regions) or any(
                getattr(m.cfg, k) != getattr(first.cfg, k)
                for k in ("use_cexp", "use_fexp", "channel_attention", "normalize_features", "low_rank_hidden")
            ):
                raise DednInputError("population", "model", "every member must share the architecture switches")
        self.cfg = first.cfg  # switches only; partitions are per member
        self.partitions = [np.asarray(m.cfg.partition) for m in models]
        self.num_members = len(models)
        self.num_attributes = first.cfg.num_attributes
        self.channels, self.regions = first.channels, first.regions
        self.register_buffer("class_attributes", first.class_attributes.clone())
        d = self.num_attributes
        shared = (first.channels, first.regions, first.cfg.channel_attention, first.cfg.low_rank_hidden, None)
        placeholder = torch.zeros(len(models) * d, 1)  # v is overwritten below; only its row count matters here
        self.cexp: ExpertWeights | None = None
        self.fexp: ExpertWeights | None = None
        with torch.no_grad():
            if first.cexp is not None:
                groups = np.repeat(np.arange(len(models)), d)
                self.cexp = _stacked(placeholder, groups, shared, [m.cexp for m in models])
            if first.fexp is not None:
                offsets = np.cumsum([0] + [int(p.max()) + 1 for p in self.partitions[:-1]])
                groups = np.concatenate([p + o for p, o in zip(self.partitions, offsets, strict=True)])
                self.fexp = _stacked(placeholder, groups, shared, [m.fexp for m in models])

    @property
    def experts(self) -> list[ExpertWeights]:
        return [e for e in (self.cexp, self.fexp) if e is not None]

    def forward(self, features: Tensor) -> Branches:
        """features (B, C, H, W) or (B, C, R) -> Branches of (B, M, D): every member's O_r and O_c."""
        f = flatten_features(features, self.channels, self.regions, self.cfg.normalize_features, "population")
        m, d = self.num_members, self.num_attributes
        outs = expert_branches(f, self.experts, m * d, self.cfg.channel_attention)
        out: list[Tensor | None] = [None] * 4
        for e, (o_r, o_c) in zip(self.experts, outs, strict=True):
            slot = 0 if e is self.cexp else 2
            out[slot] = o_r.view(-1, m, d)
            out[slot + 1] = None if o_c is None else o_c.view(-1, m, d)
        return Branches(*out)

    def scores(self, branches: Branches) -> tuple[Tensor | None, Tensor | None]:
        """Training class scores (P_ec, P_ef), each (M, B, K): O = O_r + O_c, P = O A^T."""
        a = self.class_attributes

        def p(o_r: Tensor | None, o_c: Tensor | None) -> Tensor | None:
            o = o_r if o_r is None or o_c is None else o_r + o_c
            s = class_scores(o, a)  # (B, M, K)
            return None if s is None else s.transpose(0, 1)

        return p(branches.cexp_r, branches.cexp_c), p(branches.fexp_r, branches.fexp_c)

    # -- members in and out ----------------------------------------------------------------------
    def dan_members(self, expert: ExpertWeights) -> np.ndarray:
        """(S,) member of each DAN of ``expert``."""
        if expert is self.cexp:
            return np.arange(self.num_members)
        return np.concatenate([np.full(int(p.max()) + 1, j) for j, p in enumerate(self.partitions)])

    def member_of(self) -> dict[str, Tensor]:
        """For every parameter, (dim 0,) the member each slice along dim 0 belongs to."""
        out: dict[str, Tensor] = {}
        for prefix, e in (("cexp", self.cexp), ("fexp", self.fexp)):
            if e is None:
                continue
            dans = torch.as_tensor(self.dan_members(e))
            for name, p in e.named_parameters():
                if name == "v":
                    out[f"{prefix}.v"] = torch.arange(self.num_members).repeat_interleave(self.num_attributes)
                else:
                    assert p.shape[0] == dans.numel()
                    out[f"{prefix}.{name}"] = dans
        return out

    def subset(self, keep: list[int]) -> tuple[PopulationDEDN, dict[str, Tensor]]:
        """A population of the members ``keep`` (in that order), sharing nothing with this one, and for
        each parameter the dim-0 index that selects the kept slices (to cut optimiser state alike)."""
        owners = self.member_of()
        index: dict[str, Tensor] = {}
        for name, own in owners.items():
            index[name] = torch.cat([torch.nonzero(own == j).flatten() for j in keep])
        models = [self.member_model(j) for j in keep]
        return PopulationDEDN(models).to(self.class_attributes.device), index

    def member_state(self, j: int) -> dict[str, Tensor]:
        """Member j's weights as a single-configuration ``DEDN`` state dict (on the CPU, detached)."""
        owners = self.member_of()
        state: dict[str, Tensor] = {"class_attributes": self.class_attributes.detach().cpu().clone()}
        for name, p in self.named_parameters():
            rows = torch.nonzero(owners[name] == j).flatten()
            value = p.detach()[rows.to(p.device)].cpu().clone()
            if name.endswith(".v"):
                value = value.view(self.num_attributes, -1)
            state[name] = value
        return state

    def member_model(self, j: int) -> DEDN:
        """Member j as a stand-alone ``DEDN`` (CPU)."""
        from dataclasses import replace

        cfg = replace(self.cfg, partition=tuple(int(i) for i in self.partitions[j]))
        g = self.cexp.v.shape[1] if self.cexp is not None else self.experts[0].v.shape[1]
        model = DEDN(
            cfg,
            torch.ones(self.num_attributes, g),
            torch.ones_like(self.class_attributes).cpu(),
            channels=self.channels,
            regions=self.regions,
        )
        model.load_state_dict(self.member_state(j))
        return model


def _stacked(
    placeholder: Tensor, groups: np.ndarray, shared: tuple[Any, ...], parts: list[ExpertWeights | None]
) -> ExpertWeights:
    """One ExpertWeights whose DANs are every member's DANs, in member order, weights copied from ``parts``."""
    ew = ExpertWeights(placeholder, groups, *shared)
    for name, p in ew.named_parameters():
        value = torch.cat([getattr(x, name).detach().cpu() for x in parts if x is not None])
        p.data = value.clone()
    return ew


class PopulationRMSprop:
    """RMSprop (torch.optim.RMSprop's update, not centred) with a learning rate, momentum and weight decay
    per member: each parameter's slices along dim 0 take their member's values."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        member_of: dict[str, Tensor],
        lr: list[float],
        momentum: list[float],
        weight_decay: list[float],
        alpha: float = 0.99,
        eps: float = 1e-8,
    ) -> None:
        self.params, self.alpha, self.eps = params, alpha, eps
        self.hyper = {"lr": list(lr), "momentum": list(momentum), "weight_decay": list(weight_decay)}
        self.member_of = member_of
        self.state: dict[str, dict[str, Tensor]] = {
            k: {"square_avg": torch.zeros_like(p), "momentum_buffer": torch.zeros_like(p)} for k, p in params.items()
        }
        self._scales: dict[str, dict[str, Tensor]] = {}

    def _scale(self, name: str, hyper: str) -> Tensor:
        cache = self._scales.setdefault(name, {})
        if hyper not in cache:
            p = self.params[name]
            values = torch.tensor(self.hyper[hyper], dtype=p.dtype, device=p.device)
            cache[hyper] = values[self.member_of[name].to(p.device)].view(-1, *([1] * (p.ndim - 1)))
        return cache[hyper]

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            grad = p.grad + self._scale(name, "weight_decay") * p
            st = self.state[name]
            st["square_avg"].mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
            avg = st["square_avg"].sqrt().add_(self.eps)
            st["momentum_buffer"].mul_(self._scale(name, "momentum")).addcdiv_(grad, avg)
            p.sub_(self._scale(name, "lr") * st["momentum_buffer"])

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "hyper": self.hyper}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name, st in saved["state"].items():
            for k, v in st.items():
                self.state[name][k].copy_(v)

    def subset(
        self, params: dict[str, nn.Parameter], member_of: dict[str, Tensor], index: dict[str, Tensor], keep: list[int]
    ) -> PopulationRMSprop:
        """The optimiser of the population ``keep`` (see ``PopulationDEDN.subset``), its state carried over."""
        new = PopulationRMSprop(
            params,
            member_of,
            [self.hyper["lr"][j] for j in keep],
            [self.hyper["momentum"][j] for j in keep],
            [self.hyper["weight_decay"][j] for j in keep],
            self.alpha,
            self.eps,
        )
        for name, st in self.state.items():
            idx = index[name].to(st["square_avg"].device)
            for k, v in st.items():
                new.state[name][k] = v[idx].clone()
        return new


def population_loss(
    branches: Branches,
    p_ec: Tensor | None,
    p_ef: Tensor | None,
    target: Tensor,
    seen_mask: Tensor,
    unseen_mask: Tensor,
    hyper: dict[str, Tensor],
    shared: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Every member's eq. 18 loss, (M,), the terms of ``dedn.model.dedn_loss`` with per-member weights.

    branches (B, M, D); p_ec/p_ef (M, B, K); ``hyper``: (M,) tensors beta, gamma, eps, lambda_cal,
    calibration; ``shared``: a LossConfig for the switches members share (mal, fidelity, distance, mal_variant).
    Returns the per-member totals and detached per-member parts (M,) each.
    """
    device = target.device
    m = next(p for p in (p_ec, p_ef) if p is not None).shape[0]
    total = torch.zeros(m, device=device)
    parts: dict[str, Tensor] = {}
    cal: Tensor | None = None
    cls_name = "mal" if shared.mal else "ce"
    per_expert = (("ec", p_ec, branches.cexp_r, branches.cexp_c), ("ef", p_ef, branches.fexp_r, branches.fexp_c))
    for tag, p, o_r, o_c in per_expert:
        if p is None:
            continue
        if shared.mal:
            cls = margin_aware_loss(p, target, seen_mask, hyper["eps"], shared.mal_variant)
        else:
            cls = cross_entropy_loss(p, target)
        parts[f"{cls_name}_{tag}"] = cls
        total = total + cls
        if o_r is not None and o_c is not None:
            align = pair_distance(o_r.transpose(0, 1), o_c.transpose(0, 1), shared.distance)  # (M,)
            parts[f"align_{tag}"] = align
            total = total + hyper["beta"] * align
        if bool((hyper["lambda_cal"] > 0).any()):
            term = self_calibration_loss(p, unseen_mask, hyper["calibration"])
            cal = term if cal is None else cal + term
    if p_ec is not None and p_ef is not None:
        if shared.fidelity == "released":
            signs = calibration_signs(unseen_mask.to(device), p_ec.dtype)  # (K,)
            shift = hyper["calibration"].view(-1, 1, 1) * signs
            distill = pair_distance(p_ec + shift, p_ef + shift, shared.distance)
        else:
            distill = pair_distance(p_ec, p_ef, shared.distance)
        parts["distill"] = distill
        total = total + hyper["gamma"] * distill
    if cal is not None:
        parts["cal"] = cal
        total = total + hyper["lambda_cal"] * cal
    parts["total"] = total
    return total, {k: v.detach() for k, v in parts.items()}


def population_forward_loss(
    model: PopulationDEDN,
    hyper: dict[str, Tensor],
    shared: Any,
    seen_mask: Tensor,
    unseen_mask: Tensor,
    bf16: bool,
) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """The population step's forward and loss, (x, y) -> ((M,) losses, parts); GEMMs under bf16 autocast
    when ``bf16``, the rest in float32 (as ``dedn.train.single_forward_loss``)."""
    device_type = model.class_attributes.device.type

    def forward_loss(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            branches = model(x)
        branches = Branches(*(b.float() if b is not None else None for b in branches))
        p_ec, p_ef = model.scores(branches)
        return population_loss(branches, p_ec, p_ef, y, seen_mask, unseen_mask, hyper, shared)

    return forward_loss


@dataclass(frozen=True)
class Halving:
    """Successive halving of members: at epochs grace_period * reduction_factor^k (k = 0, 1, ..., before
    the last epoch) keep the top ceil(n / reduction_factor) active members by best validation H so far,
    never fewer than ``min_members``."""

    grace_period: int = 2
    reduction_factor: float = 2.0
    min_members: int = 1

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise DednInputError("population", "grace_period", f"must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise DednInputError("population", "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        if self.min_members < 1:
            raise DednInputError("population", "min_members", f"must be >= 1, got {self.min_members}")

    def rungs(self, epochs: int) -> list[int]:
        out: list[int] = []
        r = float(self.grace_period)
        while round(r) < epochs:
            if not out or round(r) > out[-1]:
                out.append(round(r))
            r *= self.reduction_factor
        return out

    def survivors(self, n: int) -> int:
        return min(n, max(self.min_members, math.ceil(n / self.reduction_factor)))


@dataclass
class MemberResult:
    """One member's outcome: its TrainResult plus how it ended (``finished``, ``stopped`` by halving,
    ``failed``) and at which epoch."""

    index: int
    status: str
    last_epoch: int
    reason: str | None
    result: TrainResult


@dataclass
class PopulationProgress:
    """What the epoch callback sees: per member (all M, by index) history, best epoch and best weights,
    its status, and the live batched model and optimiser with the indices of the active members."""

    model: PopulationDEDN
    optimizer: PopulationRMSprop
    active: list[int]
    histories: list[list[EpochRecord]]
    best_epoch: list[int]
    best_state: list[dict[str, Tensor]]
    status: list[str]
    last_epoch: list[int]
    reasons: list[str | None]
    partitions: list[np.ndarray]
    peak_device_bytes: int = 0


PopulationCallback = Callable[[int, dict[int, EpochRecord], PopulationProgress], None]


def _hyper(cfgs: list[TrainConfig], keep: list[int], device: torch.device) -> dict[str, Tensor]:
    return {
        k: torch.tensor([float(getattr(cfgs[j].loss, k)) for j in keep], dtype=torch.float32, device=device)
        for k in PER_MEMBER_LOSS
    }


def train_population(
    cfgs: list[TrainConfig],
    store: FeatureStore,
    task_name: str = "validation",
    *,
    epochs: int | None = None,
    on_epoch: PopulationCallback | None = None,
    halving: Halving | None = None,
    batch_seed: int | None = None,
    select_on: str = "configured",
    resume: dict[str, Any] | None = None,
    check_each_step: bool | None = None,
) -> list[MemberResult]:
    """Train the configurations ``cfgs`` as one population and evaluate every member every epoch.

    Args:
        cfgs: validated configs; the fields in ``SHARED_FIELDS`` must agree.
        store, task_name, epochs, select_on: as ``dedn.train.train``.
        on_epoch: called after each epoch with (epoch, {member: record} of the members trained this
            epoch, PopulationProgress); halving decisions of that epoch are already in the progress.
        halving: successive-halving rule; None trains every member to the end.
        batch_seed: seed of the shared minibatch stream (default: member 0's seed).
        resume: a dict from ``population_state`` of an earlier epoch: training continues after it.
        check_each_step: drop a diverging member at the step its loss turns non-finite (a host sync per
            step); otherwise it is masked out of the loss on the device and dropped at the epoch's end.
            None: per step on a CPU, per epoch on a GPU.
    Returns:
        One MemberResult per config, in order.
    Raises:
        DednInputError: members that cannot share a model, or a store a member cannot train on.
    """
    cfgs = [c.effective() for c in cfgs]
    check_members(cfgs)
    for c in cfgs:
        check_compatible(c, store)
    first = cfgs[0]
    device = resolve_device(first.device)
    task = make_task(store, task_name)
    partitions = [resolve_partition(c, store) for c in cfgs]
    n_epochs = epochs or first.optim.epochs
    stream_seed = first.seed if batch_seed is None else batch_seed
    o = first.optim
    lshared = loss_config(first)
    source = FeatureSource(store.features(), device)
    labels = torch.as_tensor(store.labels.astype(np.int64))
    seen_mask = torch.as_tensor(task.train_seen, device=device)
    unseen_mask = ~seen_mask
    train_classes = np.flatnonzero(task.train_seen)
    m_all = len(cfgs)

    histories: list[list[EpochRecord]] = [[] for _ in cfgs]
    best_epoch, best_eval, best_grid = [0] * m_all, [{"H": -1.0} for _ in cfgs], [dict[str, float]() for _ in cfgs]
    best_state: list[dict[str, Tensor]] = [{} for _ in cfgs]
    status, last_epoch = ["active"] * m_all, [0] * m_all
    reasons: list[str | None] = [None] * m_all
    active = list(range(m_all))
    start = 1
    if resume is not None:
        histories = [[EpochRecord(**r) for r in h] for h in resume["histories"]]
        status, last_epoch, reasons = list(resume["status"]), list(resume["last_epoch"]), list(resume["reasons"])
        best_epoch = list(resume["best_epoch"])
        best_state = [dict(s) for s in resume["best_state"]]
        for j, h in enumerate(histories):
            r = next((r for r in h if r.epoch == best_epoch[j]), None)
            if r is not None:
                best_eval[j], best_grid[j] = r.eval, r.grid_best
        active = list(resume["active"])
        start = int(resume["epoch"]) + 1

    model, optimizer = _build(cfgs, store, partitions, active, device)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
    hyper = _hyper(cfgs, active, device)
    bf16 = use_bf16(first, device)
    if check_each_step is None:
        check_each_step = device.type != "cuda"

    def step_fn() -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
        fl = population_forward_loss(model, hyper, lshared, seen_mask, unseen_mask, bf16)
        return compiled(fl, first.compile)

    forward_loss = step_fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def drop(keep_local: list[int]) -> None:
        nonlocal model, optimizer, hyper, active, forward_loss
        new_active = [active[i] for i in keep_local]
        if keep_local == list(range(len(active))):
            return
        if not new_active:
            active = []
            return
        model, index = model.subset(keep_local)
        optimizer = optimizer.subset(dict(_named(model)), model.member_of(), index, keep_local)
        active = new_active
        hyper = _hyper(cfgs, active, device)
        forward_loss = step_fn()  # the batched matrices shrank: a new step (recompiled when compiling)

    for epoch in range(start, n_epochs + 1):
        if not active:
            break
        t0 = time.perf_counter()
        batches = epoch_batches(
            task.train_rows, store.labels, o.batch_size, stream_seed, epoch, o.balanced, train_classes
        )
        sums: dict[str, Tensor] = {}
        ok = torch.ones(len(active), dtype=torch.bool, device=device)  # members finite so far (deferred check)
        for rows, y in source.epoch_indices(batches, labels):
            x = source.batch(rows)
            losses, parts = forward_loss(x, y)
            finite = torch.isfinite(losses)
            optimizer.zero_grad()
            if not check_each_step:  # on a GPU: no host sync per step; diverged members leave at epoch end
                ok &= finite
                torch.where(ok, losses, torch.zeros_like(losses)).sum().backward()
                optimizer.step()
                for k, v in parts.items():
                    sums[k] = sums[k] + v * len(rows) if k in sums else v * len(rows)
                continue
            if not bool(finite.all()):  # members that diverged stop; the others take this step without them
                torch.where(finite, losses, torch.zeros_like(losses)).sum().backward()
                optimizer.step()
                bad = [active[i] for i in torch.nonzero(~finite).flatten().tolist()]
                for j in bad:
                    status[j], last_epoch[j] = "failed", epoch
                    value = float(losses.detach()[active.index(j)])
                    reasons[j] = f"loss is {value} at epoch {epoch}: training diverged"
                keep_local = [i for i, j in enumerate(active) if j not in bad]
                for k, v in parts.items():
                    sums[k] = sums[k] + v * len(rows) if k in sums else v * len(rows)
                sums = {k: v[keep_local] for k, v in sums.items()}
                drop(keep_local)
                if not active:
                    break
                continue
            losses.sum().backward()
            optimizer.step()
            for k, v in parts.items():
                sums[k] = sums[k] + v * len(rows) if k in sums else v * len(rows)
        if not check_each_step and active and not bool(ok.all()):
            bad = [active[i] for i in torch.nonzero(~ok).flatten().tolist()]
            for j in bad:
                status[j], last_epoch[j] = "failed", epoch
                reasons[j] = f"loss is not finite in epoch {epoch}: training diverged"
            keep_local = [i for i, j in enumerate(active) if j not in bad]
            sums = {k: v[keep_local] for k, v in sums.items()}
            drop(keep_local)
        if not active:
            break
        n_seen = sum(len(b) for b in batches)
        train_s = time.perf_counter() - t0
        model.eval()
        branches_all = branch_outputs(model, source.rows(task.eval_rows), first.eval_batch_size)  # type: ignore[arg-type]
        model.train()
        records: dict[int, EpochRecord] = {}
        for i, j in enumerate(active):
            member_branches = Branches(*(b[:, i] if b is not None else None for b in branches_all))
            configured, grid_best, _ = evaluate_branches(member_branches, model.class_attributes, store, task, cfgs[j])
            rec = EpochRecord(
                epoch=epoch,
                loss={k: float(v[i]) / n_seen for k, v in sums.items()},
                eval=configured,
                grid_best=grid_best,
                seconds=time.perf_counter() - t0,
                samples_per_s=n_seen / train_s,  # each member's rate; the population's is len(active) times it
            )
            histories[j].append(rec)
            records[j] = rec
            last_epoch[j] = epoch
            score = (grid_best if select_on == "grid" else configured).get("H", -1.0)
            if score > best_eval[j]["H"]:
                best_epoch[j], best_eval[j], best_grid[j] = epoch, configured, grid_best
                best_state[j] = model.member_state(i)
        if halving is not None and epoch in halving.rungs(n_epochs) and len(active) > 1:
            keep_n = halving.survivors(len(active))
            ranked = sorted(
                range(len(active)),
                key=lambda i: -(best_grid if select_on == "grid" else best_eval)[active[i]]["H"],
            )
            keep_local = sorted(ranked[:keep_n])
            for i in ranked[keep_n:]:
                j = active[i]
                status[j] = "stopped"
                reasons[j] = f"stopped by successive halving at epoch {epoch}"
            drop(keep_local)
        if on_epoch is not None:
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            on_epoch(
                epoch,
                records,
                PopulationProgress(
                    model,
                    optimizer,
                    list(active),
                    histories,
                    best_epoch,
                    best_state,
                    status,
                    last_epoch,
                    reasons,
                    partitions,
                    peak,
                ),
            )
    results = []
    for j in range(m_all):
        if status[j] == "active":
            status[j] = "finished"
        results.append(
            MemberResult(
                j,
                status[j],
                last_epoch[j],
                reasons[j],
                TrainResult(
                    task.name, histories[j], best_epoch[j], best_eval[j], best_grid[j], best_state[j], partitions[j]
                ),
            )
        )
    return results


def _named(model: PopulationDEDN) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())


def _build(
    cfgs: list[TrainConfig],
    store: FeatureStore,
    partitions: list[np.ndarray],
    active: list[int],
    device: torch.device,
) -> tuple[PopulationDEDN, PopulationRMSprop]:
    """The batched model of the members ``active``, each initialised exactly as ``build_model`` would."""
    cpu = torch.device("cpu")
    members = [build_model(cfgs[j], store, partitions[j], cpu) for j in active]
    model = PopulationDEDN(members).to(device)
    optimizer = PopulationRMSprop(
        dict(_named(model)),
        model.member_of(),
        [cfgs[j].optim.lr for j in active],
        [cfgs[j].optim.momentum for j in active],
        [cfgs[j].optim.weight_decay for j in active],
    )
    return model, optimizer


def population_state(epoch: int, p: PopulationProgress) -> dict[str, Any]:
    """Everything ``train_population(resume=...)`` needs, as tensors and plain values
    (``torch.save``-able and loadable with weights_only=True)."""
    from dataclasses import asdict

    return {
        "epoch": epoch,
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "active": list(p.active),
        "histories": [[asdict(r) for r in h] for h in p.histories],
        "best_epoch": list(p.best_epoch),
        "best_state": list(p.best_state),
        "status": list(p.status),
        "last_epoch": list(p.last_epoch),
        "reasons": list(p.reasons),
    }


__all__ = [
    "Halving",
    "MemberResult",
    "PopulationDEDN",
    "PopulationProgress",
    "PopulationRMSprop",
    "check_members",
    "population_loss",
    "population_state",
    "train_population",
]
