"""Population training: M DEDN configurations trained as one batched model on a shared minibatch stream.

A DEDN step at the paper's batch size (50) leaves a large GPU mostly idle; stacking M configurations
into one model fills it. Every member keeps its own weights, its own loss hyperparameters (beta, gamma,
eps, lambda_cal, calibration), attribute partition, learning rate, momentum, weight decay and seed (the
seed initialises its weights); members share the batch size, the epochs, the architecture switches and
the minibatch stream. The fused matrices of all members are stacked, so each branch is still one
GEMM: (B, R, C) @ (C, 2 E M D) for the region branch. Features are read once per step for all members.

The batched model and its optimiser live in ``dedn.population_model``; the loop here shares its parts
with ``dedn.train`` (``dedn.build``, ``dedn.feeding``, ``dedn.evaluation``, ``dedn.device``). Each
member is numerically the training of its configuration alone on the same minibatch stream
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
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

from dedn.build import StepFn, build_model, build_step, check_compatible
from dedn.config import SelectOn, TrainConfig
from dedn.data.store import FeatureStore
from dedn.device import compiled, resolve_device, use_bf16
from dedn.errors import DednInputError
from dedn.evaluation import Task, branch_outputs, evaluate_branches, make_task
from dedn.feeding import FeatureSource, epoch_batches
from dedn.losses import PER_MEMBER_LOSS
from dedn.model import Branches
from dedn.partitions import resolve_partition
from dedn.population_model import PopulationDEDN, PopulationRMSprop
from dedn.records import EpochRecord, TrainResult, selection_value

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
class Member:
    """One configuration of a population: what it trained so far, its best epoch, and how it ended
    (``active``, then ``finished``, ``stopped`` by halving or ``failed``)."""

    index: int
    cfg: TrainConfig
    partition: np.ndarray
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_eval: dict[str, float] = field(default_factory=lambda: {"H": -1.0})
    best_grid: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, Tensor] = field(default_factory=dict)
    status: str = "active"
    last_epoch: int = 0
    reason: str | None = None

    def best_score(self, select_on: str) -> float:
        return selection_value(self.best_grid if select_on == "grid" else self.best_eval)

    def result(self, task: str) -> MemberResult:
        """How the member ended (``finished`` if it was still active) and its TrainResult."""
        if self.status == "active":
            self.status = "finished"
        return MemberResult(
            self.index,
            self.status,
            self.last_epoch,
            self.reason,
            TrainResult(
                task, self.history, self.best_epoch, self.best_eval, self.best_grid, self.best_state, self.partition
            ),
        )

    def end(self, status: str, epoch: int | None, reason: str) -> None:
        self.status, self.reason = status, reason
        if epoch is not None:
            self.last_epoch = epoch


@dataclass
class PopulationProgress:
    """What the epoch callback sees: every member (all M, by index) and the live batched model and
    optimiser with the indices of the active members. The per-member views (``histories``, ``status``, ...)
    are lists by member index."""

    model: PopulationDEDN
    optimizer: PopulationRMSprop
    active: list[int]
    members: list[Member]
    peak_device_bytes: int = 0

    @property
    def histories(self) -> list[list[EpochRecord]]:
        return [m.history for m in self.members]

    @property
    def best_epoch(self) -> list[int]:
        return [m.best_epoch for m in self.members]

    @property
    def best_state(self) -> list[dict[str, Tensor]]:
        return [m.best_state for m in self.members]

    @property
    def status(self) -> list[str]:
        return [m.status for m in self.members]

    @property
    def last_epoch(self) -> list[int]:
        return [m.last_epoch for m in self.members]

    @property
    def reasons(self) -> list[str | None]:
        return [m.reason for m in self.members]

    @property
    def partitions(self) -> list[np.ndarray]:
        return [m.partition for m in self.members]


PopulationCallback = Callable[[int, dict[int, EpochRecord], PopulationProgress], None]


class _Batched:
    """The active members as one model: the stacked model, its optimiser, the (M,) loss weights and the
    step. ``keep`` cuts members out of all of them."""

    def __init__(
        self, members: list[Member], active: list[int], store: FeatureStore, task: Task, device: torch.device
    ) -> None:
        first = members[0].cfg
        self.members, self.active, self.device = members, list(active), device
        self.seen_mask = torch.as_tensor(task.train_seen, device=device)
        self.bf16, self.compile = use_bf16(first, device), first.compile
        self.loss_cfg = first.loss
        cpu = torch.device("cpu")  # each member initialised exactly as build_model does for it alone
        self.model = PopulationDEDN([build_model(members[j].cfg, store, members[j].partition, cpu) for j in active])
        self.model.to(device)
        cfgs = [members[j].cfg.optim for j in active]
        self.optimizer = PopulationRMSprop(
            dict(self.model.named_parameters()),
            self.model.member_of(),
            [c.lr for c in cfgs],
            [c.momentum for c in cfgs],
            [c.weight_decay for c in cfgs],
        )
        self.step = self._step()

    def _step(self) -> StepFn:
        cfgs = [self.members[j].cfg.loss for j in self.active]
        hyper: dict[str, float | Tensor] = {
            k: torch.tensor([float(getattr(c, k)) for c in cfgs], dtype=torch.float32, device=self.device)
            for k in PER_MEMBER_LOSS
        }
        if not any(c.lambda_cal > 0 for c in cfgs):
            hyper["lambda_cal"] = 0.0  # no member calibrates: the term is not computed at all
        fl = build_step(self.model, self.loss_cfg, self.seen_mask, ~self.seen_mask, self.bf16, hyper)
        return compiled(fl, self.compile)

    def keep(self, keep_local: list[int]) -> None:
        """Keep the active members at local positions ``keep_local`` (in order)."""
        if keep_local == list(range(len(self.active))):
            return
        self.active = [self.active[i] for i in keep_local]
        if not self.active:
            return
        self.model, index = self.model.subset(keep_local)
        params = dict(self.model.named_parameters())
        self.optimizer = self.optimizer.subset(params, self.model.member_of(), index, keep_local)
        self.step = self._step()  # the batched matrices shrank: a new step (recompiled when compiling)


def train_population(
    cfgs: list[TrainConfig],
    store: FeatureStore,
    task_name: str = "validation",
    *,
    epochs: int | None = None,
    on_epoch: PopulationCallback | None = None,
    halving: Halving | None = None,
    batch_seed: int | None = None,
    select_on: SelectOn = "configured",
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
        DednInputError: members that cannot share a model, a store a member cannot train on, or an
            unknown ``select_on``.
    """
    if select_on not in get_args(SelectOn):
        raise DednInputError("population", "select_on", f"must be one of {get_args(SelectOn)}, got {select_on!r}")
    cfgs = [c.effective() for c in cfgs]
    check_members(cfgs)
    for c in cfgs:
        check_compatible(c, store)
    first = cfgs[0]
    device = resolve_device(first.device)
    task = make_task(store, task_name)
    members = [Member(j, c, resolve_partition(c, store)) for j, c in enumerate(cfgs)]
    active, start = list(range(len(cfgs))), 1
    if resume is not None:
        active, start = _restore(members, resume), int(resume["epoch"]) + 1
    live = _Batched(members, active, store, task, device)
    if resume is not None:
        live.model.load_state_dict(resume["model"])
        live.optimizer.load_state_dict(resume["optimizer"])
    source = FeatureSource(store.features(), device)
    labels = torch.as_tensor(store.labels.astype(np.int64))
    check_each_step = device.type != "cuda" if check_each_step is None else check_each_step
    n_epochs = epochs or first.optim.epochs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(start, n_epochs + 1):
        if not live.active:
            break
        t0 = time.perf_counter()
        o = first.optim
        seed = first.seed if batch_seed is None else batch_seed
        batches = epoch_batches(
            task.train_rows, store.labels, o.batch_size, seed, epoch, o.balanced, np.flatnonzero(task.train_seen)
        )
        sums = _train_epoch(live, source, source.epoch_indices(batches, labels), check_each_step, epoch)
        if not live.active:
            break
        n_seen = sum(len(b) for b in batches)
        records = _evaluate_members(live, source, store, task, epoch, sums, n_seen, t0, select_on)
        if halving is not None and epoch in halving.rungs(n_epochs) and len(live.active) > 1:
            _halve(live, halving, epoch, select_on)
        if on_epoch is not None:
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            on_epoch(epoch, records, PopulationProgress(live.model, live.optimizer, list(live.active), members, peak))
    return [m.result(task.name) for m in members]


def _restore(members: list[Member], saved: dict[str, Any]) -> list[int]:
    """Put a ``population_state`` back into the members; returns the active members' indices."""
    for j, m in enumerate(members):
        m.history = [EpochRecord(**r) for r in saved["histories"][j]]
        m.status, m.last_epoch, m.reason = saved["status"][j], saved["last_epoch"][j], saved["reasons"][j]
        m.best_epoch, m.best_state = saved["best_epoch"][j], dict(saved["best_state"][j])
        r = next((r for r in m.history if r.epoch == m.best_epoch), None)
        if r is not None:
            m.best_eval, m.best_grid = r.eval, r.grid_best
    return list(saved["active"])


def _train_epoch(
    live: _Batched, source: FeatureSource, steps: list[tuple[Any, Tensor]], check_each_step: bool, epoch: int
) -> dict[str, Tensor]:
    """One pass over the epoch's minibatches for every active member; returns each member's loss parts
    summed over samples, (n active,) each. A member whose loss turns non-finite fails and is cut out: at
    that step (``check_each_step``) or, masked out of the loss on the device until then, at the epoch's end."""
    sums: dict[str, Tensor] = {}

    def add(parts: dict[str, Tensor], n: int) -> None:
        for k, v in parts.items():
            sums[k] = sums[k] + v * n if k in sums else v * n

    def fail(reasons: dict[int, str]) -> None:  # local index -> why it failed
        nonlocal sums
        for i, why in reasons.items():
            live.members[live.active[i]].end("failed", epoch, why)
        keep_local = [i for i in range(len(live.active)) if i not in reasons]
        sums = {k: v[keep_local] for k, v in sums.items()}
        live.keep(keep_local)

    ok = torch.ones(len(live.active), dtype=torch.bool, device=live.device)  # finite so far (deferred check)
    for rows, y in steps:
        losses, parts = live.step(source.batch(rows), y)
        finite = torch.isfinite(losses)
        live.optimizer.zero_grad()
        if not check_each_step:  # on a GPU: no host sync per step; diverged members leave at epoch end
            ok &= finite
            torch.where(ok, losses, torch.zeros_like(losses)).sum().backward()
            live.optimizer.step()
            add(parts, len(rows))
            continue
        if bool(finite.all()):
            losses.sum().backward()
            live.optimizer.step()
            add(parts, len(rows))
            continue
        # members that diverged stop; the others take this step without them
        torch.where(finite, losses, torch.zeros_like(losses)).sum().backward()
        live.optimizer.step()
        add(parts, len(rows))
        values = losses.detach()
        bad = torch.nonzero(~finite).flatten().tolist()
        fail({i: f"loss is {float(values[i])} at epoch {epoch}: training diverged" for i in bad})
        if not live.active:
            return sums
    if not check_each_step and live.active and not bool(ok.all()):
        fail(
            {
                i: f"loss is not finite in epoch {epoch}: training diverged"
                for i in torch.nonzero(~ok).flatten().tolist()
            }
        )
    return sums


def _evaluate_members(
    live: _Batched,
    source: FeatureSource,
    store: FeatureStore,
    task: Task,
    epoch: int,
    sums: dict[str, Tensor],
    n_seen: int,
    t0: float,
    select_on: str,
) -> dict[int, EpochRecord]:
    """Score every active member on the task's evaluation images from one batched forward pass; record
    the epoch and keep each member's best weights."""
    train_s = time.perf_counter() - t0
    live.model.eval()
    first = live.members[live.active[0]].cfg
    branches_all = branch_outputs(live.model, source.rows(task.eval_rows), first.eval_batch_size)  # type: ignore[arg-type]
    live.model.train()
    records: dict[int, EpochRecord] = {}
    for i, j in enumerate(live.active):
        m = live.members[j]
        member_branches = Branches(*(b[:, i] if b is not None else None for b in branches_all))
        configured, grid_best, _ = evaluate_branches(member_branches, live.model.class_attributes, store, task, m.cfg)
        rec = EpochRecord(
            epoch=epoch,
            loss={k: float(v[i]) / n_seen for k, v in sums.items()},
            eval=configured,
            grid_best=grid_best,
            seconds=time.perf_counter() - t0,
            samples_per_s=n_seen / train_s,  # each member's rate; the population's is len(active) times it
        )
        m.history.append(rec)
        records[j] = rec
        m.last_epoch = epoch
        if rec.score(select_on) > m.best_score(select_on):
            m.best_epoch, m.best_eval, m.best_grid = epoch, configured, grid_best
            m.best_state = live.model.member_state(i)
    return records


def _halve(live: _Batched, halving: Halving, epoch: int, select_on: str) -> None:
    """A rung of successive halving: the top members by best validation H so far go on."""
    keep_n = halving.survivors(len(live.active))
    ranked = sorted(range(len(live.active)), key=lambda i: -live.members[live.active[i]].best_score(select_on))
    for i in ranked[keep_n:]:
        live.members[live.active[i]].end("stopped", None, f"stopped by successive halving at epoch {epoch}")
    live.keep(sorted(ranked[:keep_n]))


def population_state(epoch: int, p: PopulationProgress) -> dict[str, Any]:
    """Everything ``train_population(resume=...)`` needs, as tensors and plain values
    (``torch.save``-able and loadable with weights_only=True)."""
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
    "SHARED_FIELDS",
    "Halving",
    "Member",
    "MemberResult",
    "PopulationProgress",
    "check_members",
    "population_state",
    "train_population",
]
