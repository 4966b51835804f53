from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.errors import DednInputError
from dedn.model import mix_scores
from dedn.released import load_released_checkpoint, load_released_state_dict
from tests.helpers import released_sun_indicator

D, G, C, R, K, HIDDEN = 10, 5, 8, 9, 5, 3
# Cluster order differs from attribute order: cluster 0 holds attributes 1, 4, 5.
IDS = np.array([2, 0, 1, 2, 0, 0, 1, 2, 2, 1])
ORDER = np.argsort(IDS, kind="stable")  # attribute at each cluster-order column
SEEN = torch.tensor([True, False, True, True, False])


def released_state(sun: bool = False, seed: int = 0, ids: np.ndarray = IDS) -> dict[str, Tensor]:
    """A state dict in the released layout, with trained-looking (all non-zero) weights."""
    g = torch.Generator().manual_seed(seed)
    d = ids.size
    order = np.argsort(ids, kind="stable")

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * 0.7

    w2v = randn(d, G)

    def subnet(prefix: str, v: Tensor) -> dict[str, Tensor]:
        out = {f"{prefix}.V": F.normalize(v) + 0.1 * randn(*v.shape)}
        if sun:
            shapes = {"H_1": (G, HIDDEN), "H_2": (G, C), "H_3": (HIDDEN, C), "H_4": (G, R), "H_5": (G, R)}
        else:
            shapes = {"H_1": (G, C), "H_2": (G, C), "H_3": (G, R), "H_4": (G, R)}
        out.update({f"{prefix}.{name}": randn(*shape) for name, shape in shapes.items()})
        return out

    state = subnet("GNet", w2v)  # released GNet keeps the original attribute order
    for q in range(ids.max() + 1):
        state.update(subnet(f"Snet{q}", w2v[torch.from_numpy(q == ids)]))
    a = torch.rand(K, d, generator=g)
    state["att"] = F.normalize(a[:, torch.from_numpy(order)])  # columns in cluster order
    state["weight_ce"] = torch.eye(K)
    state["bias"] = torch.tensor(1)  # the released script passes an int
    mask_bias = torch.ones(1, K)
    mask_bias[:, SEEN] = -1
    state["mask_bias"] = mask_bias
    return state


def released_scores(
    state: dict[str, Tensor], x: Tensor, mixcr: float, e_mix: float, sun: bool, ids: np.ndarray = IDS
) -> Tensor:
    """The released model's eval-mode forward and eval mixing, transcribed (cluster order throughout)."""
    fs = F.normalize(x.reshape(x.shape[0], x.shape[1], -1), dim=1)  # batch x C x R
    ind = torch.from_numpy(ids)

    def subnet(p: str, fs: Tensor) -> tuple[Tensor, Tensor]:
        v = state[f"{p}.V"]
        if sun:
            s_c = torch.einsum("iv,vf,fc,bcr->bir", v, state[f"{p}.H_1"], state[f"{p}.H_3"], fs)
        else:
            s_c = torch.einsum("iv,vf,bfr->bir", v, state[f"{p}.H_1"], fs)
        a_c = F.softmax(torch.einsum("iv,vf,bfr->bir", v, state[f"{p}.H_2"], fs), dim=-1)
        s_pc = a_c * s_c
        ft = fs.transpose(1, 2)
        score, att = ("H_4", "H_5") if sun else ("H_3", "H_4")
        s_c = torch.einsum("iv,vf,bfr->bir", v, state[f"{p}.{score}"], ft)
        a_c = F.softmax(torch.einsum("iv,vf,bfr->bir", v, state[f"{p}.{att}"], ft), dim=-1)
        return s_pc, a_c * s_c

    q_count = int(ids.max()) + 1
    vec_bias = state["mask_bias"] * state["bias"]
    subs = [subnet(f"Snet{q}", fs) for q in range(q_count)]
    s_pa = torch.cat([s[0] for s in subs], dim=1).sum(2)
    s_pg = torch.cat([s[1] for s in subs], dim=1).sum(2)
    s_pa = mixcr * s_pa + (1 - mixcr) * s_pg
    s_ppa = torch.einsum("ki,bi->bik", state["att"], s_pa).sum(1) + vec_bias
    g_p, g_pg = subnet("GNet", fs)
    g_pa = torch.cat([g_p[:, ind == q] for q in range(q_count)], dim=1).sum(2)
    g_pag = torch.cat([g_pg[:, ind == q] for q in range(q_count)], dim=1).sum(2)
    g_pa = mixcr * g_pa + (1 - mixcr) * g_pag
    s_pp = torch.einsum("ki,bi->bik", state["att"], g_pa).sum(1) + vec_bias
    return e_mix * s_pp + (1 - e_mix) * s_ppa  # package1 is GNet (cExp), package2 the subnets (fExp)


@pytest.mark.parametrize("sun", [False, True], ids=["cub-awa2-layout", "sun-low-rank-layout"])
def test_imported_model_matches_released_forward(tmp_path: Path, sun: bool) -> None:
    state = released_state(sun=sun)
    path = tmp_path / "released.pth"
    torch.save(state, path)
    model, c, seen = load_released_checkpoint(path, IDS)
    assert c == 1.0 and torch.equal(seen, SEEN)
    assert model.cfg.low_rank_hidden == (HIDDEN if sun else None)
    model.eval()
    x = torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        b = model(x)
        for mixcr, e_mix in [(0.8, 0.9), (0.95, 0.3), (0.0, 1.0)]:
            p_ec, p_ef = model.scores(b, mixcr)
            ours = mix_scores(p_ec, p_ef, e_mix, c, ~seen)
            ref = released_scores(state, x, mixcr, e_mix, sun)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_released_sun_checkpoint_imports_with_the_released_preset(tmp_path: Path) -> None:
    from dedn.partitions import presets_for

    indicator = released_sun_indicator()
    state = released_state(sun=True, seed=4, ids=indicator)  # Snet q holds the file's group q
    assert [state[f"Snet{q}.V"].shape[0] for q in range(4)] == [64, 27, 9, 2]
    path = tmp_path / "sun.pth"
    torch.save(state, path)
    _, preset = presets_for("SUN", 102)["released"]
    model, c, seen = load_released_checkpoint(path, preset)
    assert model.cfg.low_rank_hidden == HIDDEN and model.cfg.num_clusters == 4
    model.eval()
    x = torch.randn(3, C, 3, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        b = model(x)
        for mixcr, e_mix in [(0.95, 0.3), (0.5, 0.5)]:
            p_ec, p_ef = model.scores(b, mixcr)
            ours = mix_scores(p_ec, p_ef, e_mix, c, ~seen)
            ref = released_scores(state, x, mixcr, e_mix, sun=True, ids=indicator)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # The paper's table (38/27/17/20) cannot hold this file: the Snet row counts disagree.
    _, manual = presets_for("SUN", 102)["manual"]
    with pytest.raises(DednInputError, match=r"Snet0.V: must have shape \(38"):
        load_released_checkpoint(path, manual)


def test_rows_return_to_attribute_order() -> None:
    state = released_state()
    model, _, _ = load_released_state_dict(state, IDS)
    assert model.cexp is not None and model.fexp is not None
    torch.testing.assert_close(model.class_attributes[:, torch.from_numpy(ORDER)], state["att"], atol=0, rtol=0)
    for q in range(3):
        rows = torch.from_numpy(np.flatnonzero(q == IDS))
        assert torch.equal(model.fexp.v[rows], state[f"Snet{q}.V"])
        assert torch.equal(model.fexp.w1[q], state[f"Snet{q}.H_1"])
    assert torch.equal(model.cexp.v, state["GNet.V"])


def test_gnet_rows_in_cluster_order(tmp_path: Path) -> None:
    state = released_state()
    model_a, _, _ = load_released_state_dict(state, IDS)
    permuted = dict(state, **{"GNet.V": state["GNet.V"][torch.from_numpy(ORDER)]})
    model_c, _, _ = load_released_state_dict(permuted, IDS, gnet_order="cluster")
    assert model_a.cexp is not None and model_c.cexp is not None
    assert torch.equal(model_a.cexp.v, model_c.cexp.v)


def test_wrapped_checkpoints_are_accepted(tmp_path: Path) -> None:
    state = released_state()
    for i, wrapped in enumerate([{"state_dict": state}, {"model": {f"module.{k}": v for k, v in state.items()}}]):
        path = tmp_path / f"wrapped{i}.pth"
        torch.save(wrapped, path)
        model, _, _ = load_released_checkpoint(path, IDS)
        assert model.cexp is not None and torch.equal(model.cexp.v, state["GNet.V"])


def bad(**changes: Tensor | None) -> dict[str, Tensor]:
    state = released_state()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(
    ("state", "partition", "match"),
    [
        (bad(weight_ce=torch.eye(K).flip(0)), IDS, "weight_ce: must be the K x K identity"),
        (bad(Snet1__H_2=None), IDS, "Snet1.H_2: missing"),
        (bad(GNet__H_1=torch.zeros(G, C + 1)), IDS, r"GNet.H_1: must have shape \(5, 8\)"),
        (bad(Snet0__V=torch.zeros(4, G)), IDS, r"Snet0.V: must have shape \(3, 5\)"),
        (bad(mask_bias=torch.zeros(1, K)), IDS, "mask_bias"),
        (bad(att=None), IDS, "att: missing"),
        (bad(), np.minimum(IDS, 1), "2 clusters"),
        (bad(), IDS[:-1], "partition"),
    ],
)
def test_bad_checkpoints_refused(state: dict[str, Tensor], partition: np.ndarray, match: str) -> None:
    with pytest.raises(DednInputError, match=match):
        load_released_state_dict(state, partition)


def test_unreadable_files_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DednInputError, match="garbage.pth: file"):
        load_released_checkpoint(garbage, IDS)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(DednInputError, match="state dict"):
        load_released_checkpoint(listing, IDS)
