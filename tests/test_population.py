"""Population training: every member equals training its configuration alone; halving and divergence
cut members without changing the others; resume continues the same run. Tiny real store, CPU, float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.config import load_config
from dedn.data import open_store
from dedn.errors import DednInputError
from dedn.population import Halving, population_state, train_population
from dedn.population_model import PopulationRMSprop
from dedn.train import train
from tests.helpers import TINY_CONFIG


def _cfg(store: Path, *sets: str):  # type: ignore[no-untyped-def]
    return load_config(TINY_CONFIG, [f"data.store={store}", "device=cpu", "optim.epochs=3", *sets])


MEMBERS = [
    (),
    ("optim.lr=0.003", "loss.beta=0.01", "loss.gamma=0.5", "loss.eps=0.3", "model.clusters=half"),
    ("seed=5", "model.clusters=kmeans", "model.kmeans_q=3", "optim.momentum=0.0", "loss.lambda_cal=0.1"),
    ("optim.weight_decay=0.001", "model.clusters=single", "loss.gamma=0.0"),
]


def _assert_same(member, single) -> None:  # type: ignore[no-untyped-def]
    assert [r.epoch for r in member.history] == [r.epoch for r in single.history]
    for a, b in zip(member.history, single.history, strict=True):
        assert a.loss.keys() >= {k for k in b.loss}
        for k, v in b.loss.items():
            assert a.loss[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        for k in ("U", "S", "H", "T"):
            assert a.eval[k] == pytest.approx(b.eval[k], abs=1e-6)
    assert member.best_epoch == single.best_epoch
    assert set(member.best_state) == set(single.best_state)
    for k, v in single.best_state.items():
        # RMSprop divides by the root of the squared-gradient average, so an element whose gradient is at
        # rounding level can move by up to lr per step on a rounding difference: almost every element
        # agrees to 1e-4, none by more than the learning rate (1e-3 here).
        got = member.best_state[k]
        close = torch.isclose(got, v, rtol=1e-4, atol=2e-5)
        assert close.float().mean() >= 0.999, (k, float(close.float().mean()))
        torch.testing.assert_close(got, v, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(member.partition, single.partition)


def test_each_member_equals_training_it_alone(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    cfgs = [_cfg(tiny_store, *m) for m in MEMBERS]
    torch.set_num_threads(1)
    pop = train_population(cfgs, store, batch_seed=0)
    assert [m.status for m in pop] == ["finished"] * 4
    for member, cfg in zip(pop, cfgs, strict=True):
        _assert_same(member.result, train(cfg, store, batch_seed=0))


def test_released_fidelity_members_use_their_own_calibration(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    sets = ("loss.fidelity=released", "loss.mal_variant=released", "optim.epochs=2")
    cfgs = [_cfg(tiny_store, *sets, "loss.calibration=0.5"), _cfg(tiny_store, *sets, "loss.calibration=2.0")]
    pop = train_population(cfgs, store)
    for member, cfg in zip(pop, cfgs, strict=True):
        _assert_same(member.result, train(cfg, store))


def test_rmsprop_per_member_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    hyper = [(1e-2, 0.9, 0.0), (3e-3, 0.0, 1e-2)]
    stacked = torch.nn.Parameter(torch.randn(2, 3, 4, generator=g))
    refs = [torch.nn.Parameter(stacked.detach()[j].clone()) for j in range(2)]
    opt = PopulationRMSprop(
        {"w": stacked}, {"w": torch.arange(2)}, [h[0] for h in hyper], [h[1] for h in hyper], [h[2] for h in hyper]
    )
    ref_opts = [
        torch.optim.RMSprop([p], lr=lr, momentum=m, weight_decay=wd) for p, (lr, m, wd) in zip(refs, hyper, strict=True)
    ]
    for _ in range(6):
        grad = torch.randn(2, 3, 4, generator=g)
        stacked.grad = grad.clone()
        opt.step()
        for j, (p, o) in enumerate(zip(refs, ref_opts, strict=True)):
            p.grad = grad[j].clone()
            o.step()
    for j in range(2):
        torch.testing.assert_close(stacked.detach()[j], refs[j].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # long: the slow tier
def test_halving_keeps_the_best_and_leaves_survivors_unchanged(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    lrs = [3e-4, 5e-4, 8e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3]
    cfgs = [_cfg(tiny_store, f"optim.lr={lr}", "optim.epochs=5") for lr in lrs]
    halving = Halving(grace_period=2, reduction_factor=2.0)
    assert halving.rungs(5) == [2, 4]
    seen: dict[int, tuple[int, list[int]]] = {}

    def watch(epoch, records, p):  # type: ignore[no-untyped-def]
        rows = {name: int(t.shape[0]) for name, t in p.model.named_parameters()}
        seen[epoch] = (p.model.num_members, [rows["cexp.w1"], rows["cexp.v"] // store.meta.num_attributes])

    cut = train_population(cfgs, store, halving=halving, on_epoch=watch)
    full = train_population(cfgs, store)
    # members 8 -> 4 after epoch 2 -> 2 after epoch 4; the batched weights shrink with them
    assert {e: s[0] for e, s in seen.items()} == {1: 8, 2: 4, 3: 4, 4: 2, 5: 2}
    assert all(s[1] == [s[0], s[0]] for s in seen.values())
    # the survivors of each rung are the top half by best validation H so far, computed from the full run
    alive = list(range(8))
    for rung in (2, 4):
        best = {j: max(r.eval["H"] for r in full[j].result.history[:rung]) for j in alive}
        ranked = sorted(alive, key=lambda j: -best[j])
        alive = sorted(ranked[: len(alive) // 2])
        for j in ranked[len(ranked) // 2 :]:
            assert cut[j].status == "stopped" and cut[j].last_epoch == rung
            assert cut[j].reason == f"stopped by successive halving at epoch {rung}"
    assert [m.index for m in cut if m.status == "finished"] == alive
    for j in alive:  # cutting the others out of the matrices and the optimiser changes nothing for them
        _assert_same(cut[j].result, full[j].result)
    for m in cut:  # a stopped member's history is the full run's, up to its stop
        assert [r.loss["total"] for r in m.result.history] == pytest.approx(
            [r.loss["total"] for r in full[m.index].result.history[: m.last_epoch]], rel=1e-5
        )


def test_a_diverging_member_fails_alone(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    cfgs = [_cfg(tiny_store), _cfg(tiny_store, "optim.lr=1e9"), _cfg(tiny_store, "loss.gamma=0.5")]
    pop = train_population(cfgs, store)
    assert pop[1].status == "failed" and "training diverged" in (pop[1].reason or "")
    assert pop[0].status == pop[2].status == "finished"
    for j in (0, 2):
        _assert_same(pop[j].result, train(cfgs[j], store))


def test_resume_continues_the_same_population(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    cfgs = [_cfg(tiny_store, f"optim.lr={lr}", "optim.epochs=4") for lr in (5e-4, 1e-3, 3e-3)]
    halving = Halving(grace_period=1, reduction_factor=2.0)
    saved: dict = {}

    def keep(epoch, records, p):  # type: ignore[no-untyped-def]
        if epoch == 2:  # a checkpoint as a trial writes it, read back as a trial reads it
            saved.update(torch.load(_roundtrip(population_state(epoch, p)), weights_only=True))

    full = train_population(cfgs, store, halving=halving, on_epoch=keep)
    assert [m.status for m in full].count("stopped") == 2  # rungs at epochs 1 and 2: 3 -> 2 -> 1
    resumed = train_population(cfgs, store, halving=halving, resume=saved)
    for a, b in zip(resumed, full, strict=True):
        assert (a.status, a.last_epoch) == (b.status, b.last_epoch)
        _assert_same(a.result, b.result)


def _roundtrip(state: dict) -> object:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_members_that_cannot_share_a_model_are_refused(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    cfgs = [_cfg(tiny_store), _cfg(tiny_store, "optim.batch_size=16")]
    with pytest.raises(DednInputError, match=r"optim.batch_size.*must be the same for every member"):
        train_population(cfgs, store)
    with pytest.raises(DednInputError, match="reduction_factor"):
        Halving(reduction_factor=1.0)


def test_deferred_divergence_check_matches_the_per_step_one_for_the_others(tiny_store: Path) -> None:
    """The GPU way (no host sync per step: a diverged member is masked on the device and leaves at the
    epoch's end) gives the surviving members exactly what the per-step check gives them."""
    store = open_store(tiny_store)
    cfgs = [_cfg(tiny_store), _cfg(tiny_store, "optim.lr=1e9"), _cfg(tiny_store, "loss.gamma=0.5")]
    per_step = train_population(cfgs, store, check_each_step=True)
    deferred = train_population(cfgs, store, check_each_step=False)
    assert deferred[1].status == "failed" and deferred[1].last_epoch == 1
    assert "not finite in epoch 1" in (deferred[1].reason or "")
    for j in (0, 2):
        assert deferred[j].status == "finished"
        assert [r.loss for r in deferred[j].result.history] == [r.loss for r in per_step[j].result.history]
        for k, v in per_step[j].result.best_state.items():
            assert torch.equal(deferred[j].result.best_state[k], v), k
