"""Search specs and the Optuna define-by-run space, with a real in-memory Optuna study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dedn.errors import DednInputError
from tests.helpers import ROOT, TINY_CONFIG
from tuning.space import DefineByRun, load_search_spec, sampled_params, trial_config


def _spec(tmp_path: Path, body: str) -> Path:
    (tmp_path / "base.yaml").write_text(TINY_CONFIG.read_text())
    p = tmp_path / "spec.yaml"
    p.write_text("base: base.yaml\n" + body)
    return p


def test_conditional_parameters_appear_only_when_their_condition_holds(tmp_path: Path) -> None:
    spec, base, _ = load_search_spec(ROOT / "configs" / "search" / "tiny.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    define = DefineByRun(spec, posthoc_inference=False)
    seen_kmeans = seen_other = 0
    for _ in range(30):
        trial = study.ask()
        define(trial)
        params = trial.params
        if params["model.clusters"] == "kmeans":
            seen_kmeans += 1
            assert 2 <= params["model.kmeans_q"] <= 8
        else:
            seen_other += 1
            assert "model.kmeans_q" not in params
        assert 3e-4 <= params["optim.lr"] <= 3e-3
        cfg = trial_config(base, params)  # every sample is a valid training config
        assert cfg.optim.lr == params["optim.lr"]
        study.tell(trial, 0.5)
    assert seen_kmeans and seen_other


def test_posthoc_inference_leaves_inference_parameters_out() -> None:
    spec, _, _ = load_search_spec(ROOT / "configs" / "search" / "tiny.yaml")
    study = optuna.create_study()
    trial = study.ask()
    DefineByRun(spec, posthoc_inference=True)(trial)
    assert not any(k.startswith("inference.") for k in trial.params)
    trial2 = study.ask()
    DefineByRun(spec, posthoc_inference=False)(trial2)
    assert {"inference.lambda_rc", "inference.lambda_e", "inference.calibration"} <= set(trial2.params)


def test_bad_specs_fail_at_load(tmp_path: Path) -> None:
    with pytest.raises(DednInputError, match=r"params.optim.lr.*low < high"):
        load_search_spec(_spec(tmp_path, "params:\n  optim.lr: {type: uniform, low: 1, high: 0.1}\n"))
    with pytest.raises(DednInputError, match="loguniform needs low > 0"):
        load_search_spec(_spec(tmp_path, "params:\n  optim.lr: {type: loguniform, low: 0, high: 1}\n"))
    with pytest.raises(DednInputError, match="must be a parameter listed before it"):
        load_search_spec(
            _spec(tmp_path, "params:\n  model.kmeans_q: {type: int, low: 2, high: 4, when: {model.clusters: kmeans}}\n")
        )
    with pytest.raises(DednInputError, match=r"params.optim.momentum: is not a valid training-config value"):
        load_search_spec(_spec(tmp_path, "params:\n  optim.momentum: {type: uniform, low: 0.5, high: 1.5}\n"))
    with pytest.raises(DednInputError, match=r"params.optim.colour"):
        load_search_spec(_spec(tmp_path, "params:\n  optim.colour: {type: categorical, choices: [red]}\n"))
    with pytest.raises(DednInputError, match="num_samples"):
        load_search_spec(_spec(tmp_path, "num_samples: 0\nparams: {}\n"))
    with pytest.raises(DednInputError, match=r"epoch_metrics.*'all' or 'key'"):
        load_search_spec(_spec(tmp_path, "epoch_metrics: keys\nparams: {}\n"))


def test_sampled_params_keep_only_dotted_keys() -> None:
    assert sampled_params({"optim.lr": 1e-3, "trial_id": "x"}) == {"optim.lr": 1e-3}


def test_space_is_checked_against_the_store(tmp_path: Path, tiny_store: Path) -> None:
    from tuning.search import SearchOptions, prepare

    too_many = _spec(
        tmp_path,
        f"store: {tiny_store}\nparams:\n  model.clusters: {{type: categorical, choices: [kmeans]}}\n"
        "  model.kmeans_q: {type: int, low: 2, high: 40, when: {model.clusters: kmeans}}\n",
    )
    with pytest.raises(DednInputError, match=r"params.model.kmeans_q: high must be <= D=24"):
        prepare(SearchOptions(spec_path=str(too_many)))
    unknown = _spec(
        tmp_path, f"store: {tiny_store}\nparams:\n  model.clusters: {{type: categorical, choices: [manual, wings]}}\n"
    )
    with pytest.raises(DednInputError, match=r"params.model.clusters: choice 'wings'"):
        prepare(SearchOptions(spec_path=str(unknown)))
    ok = _spec(
        tmp_path, f"store: {tiny_store}\nparams:\n  model.clusters: {{type: categorical, choices: [manual, half]}}\n"
    )
    assert prepare(SearchOptions(spec_path=str(ok)))[2] == str(tiny_store)
