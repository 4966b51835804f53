"""Search specs (YAML under ``configs/search/``, e.g. ``tiny.yaml``), validated once and turned into an Optuna
define-by-run space. ``base`` is the training config the trials start from (relative to the spec); ``params`` maps
dotted training-config paths to distributions, e.g. ``model.kmeans_q: {type: int, low: 2, high: 8, when:
{model.clusters: kmeans}}``, where ``when`` samples it only when every named parameter took the given value."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dedn.config import TrainConfig, set_path, validate_config
from dedn.errors import DednInputError, DednInputErrors
from dedn.safe_yaml import load_mapping

__all__ = [
    "INFERENCE_PARAMS",
    "DefineByRun",
    "SearchSpec",
    "chosen_values",
    "load_search_spec",
    "sampled_params",
    "trial_config",
]

INFERENCE_PARAMS = ("inference.lambda_rc", "inference.lambda_e", "inference.calibration")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"needs finite low and high, got low={self.low} high={self.high}")
        if not self.low < self.high:
            raise ValueError(f"needs low < high, got low={self.low} high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class SchedulerSpec(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class PopulationSpec(_Strict):
    """Population trials (``dedn search --population M``): ``size`` configurations per Tune trial, trained
    as one batched model; members are cut by successive halving at epochs grace_period * eta^k."""

    size: int = Field(1, ge=1)
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    min_members: int = Field(1, ge=1)
    halving: bool = True


class SearchSpec(_Strict):
    """A search: base training config, space, sampler and scheduler settings."""

    base: str
    store: str | None = None
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    seed: int = 0
    max_failures: int = Field(1, ge=0)
    params: dict[str, ParamSpec]
    points_to_evaluate: list[dict[str, Any]] = []
    scheduler: SchedulerSpec = SchedulerSpec()
    population: PopulationSpec = PopulationSpec()
    # reuse_actors: off by default as in Ray Tune, which calls it racy
    reuse_actors: bool = Field(False, description="Run new trials in finished trials' workers (faster if short).")
    posthoc_inference: bool = Field(False, description="Sweep lambda_rc, lambda_e, c on validation; never sample them.")
    objective: str | None = Field(
        None,
        description="What ASHA ranks, Optuna is told and picks the best trial: H (the base config's "
        "inference.objective, H by default), AUSUC, U@S>=x or S@U>=x.",
    )
    checkpoint_every: int = Field(1, ge=1, description="Every N epochs, at the last and whenever the best improves.")
    # key (val_H, sent at most a minute late: most member runs cost one request) is for population searches on many
    # GPUs, where the tracking server is the limit; the parent run's epochs.parquet holds every value either way
    epoch_metrics: Literal["all", "key"] = Field("all", description="Epoch metrics to MLflow: all (~20) or key.")
    # default sqlite:///<experiment>/optuna.db; dedn search --optuna-storage overrides it
    optuna_storage: str | None = Field(None, description="sqlite:///PATH, postgresql://... or journal:PATH")

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str | None) -> str | None:
        from dedn.metrics import parse_objective

        if v is not None:
            parse_objective(v)
        return None if v is None else v.replace(" ", "")

    @field_validator("optuna_storage")
    @classmethod
    def _storage_form(cls, url: str | None) -> str | None:
        from tuning.optuna_storage import storage_rule

        if url is not None and (rule := storage_rule(url)) is not None:
            raise ValueError(rule)
        return url

    @model_validator(mode="after")
    def _conditions_refer_to_earlier_params(self) -> SearchSpec:
        seen: set[str] = set()
        for name, p in self.params.items():
            for dep in p.when or {}:
                if dep not in seen:
                    raise ValueError(f"{name}: 'when' refers to {dep!r}, which must be a parameter listed before it")
            seen.add(name)
        return self


def load_search_spec(path: str | os.PathLike[str]) -> tuple[SearchSpec, dict[str, Any], Path]:
    """(spec, base training config as a raw mapping, its path). Raises DednInputError(s) for a bad spec or base,
    and for a parameter whose low, high or any choice (with the parameters it switches on) is no valid config."""
    p = Path(path)
    raw = load_mapping(p, "search spec")  # bounded: size, encoding, alias bombs (dedn.safe_yaml)
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as e:
        errors = [(".".join(map(str, err["loc"])) or "spec", err["msg"]) for err in e.errors()]
        raise DednInputErrors(p, errors) from None
    try:
        base_path = (p.parent / spec.base).resolve()
        found = base_path.is_file()
    except (OSError, ValueError) as e:  # a NUL byte, a symlink loop
        raise DednInputError(p, "base", f"not a usable path: {e}") from None
    if not found:
        raise DednInputError(p, "base", f"training config {base_path} not found")
    base_raw = load_mapping(base_path, "base config")  # its problems name the base file itself
    checked_base = _with_store(base_raw, spec.store)
    validate_config(checked_base, str(base_path))  # the base on its own, before the parameters are tried on it
    for name, ps in spec.params.items():
        for probe in [ps.low, ps.high] if ps.choices is None else ps.choices:
            value = int(probe) if ps.type == "int" else probe  # type: ignore[arg-type]
            values = {name: value}
            for other, os_ in spec.params.items():  # parameters this value switches on, at their first value
                if os_.when and all(values.get(k) == v for k, v in os_.when.items()):
                    first = os_.choices[0] if os_.choices else os_.low
                    values[other] = int(first) if os_.type == "int" else first  # type: ignore[arg-type]
            try:
                trial_config(checked_base, values, source=f"{p} params.{name}")
            except DednInputError as e:
                raise DednInputError(
                    p, f"params.{name}", f"is not a valid training-config value at {value!r} ({e.rule})"
                ) from None
    return spec, base_raw, base_path


def _with_store(base_raw: dict[str, Any], store: str | None) -> dict[str, Any]:
    """The base config with a stand-in ``data.store`` where it names none (the spec, or --store, gives it)."""
    data = base_raw.get("data", {})
    if not isinstance(data, dict) or "store" in data:
        return base_raw
    return {**base_raw, "data": {**data, "store": store or "."}}


def trial_config(base_raw: dict[str, Any], sampled: dict[str, Any], source: str = "trial") -> TrainConfig:
    """The base training config with a trial's sampled values set at their dotted paths, validated."""
    raw = copy.deepcopy(base_raw)
    for key, value in sampled.items():
        set_path(raw, key, value, source)
    return validate_config(raw, source)


class DefineByRun:
    """The Optuna define-by-run space (picklable: Tune saves the searcher). With ``posthoc_inference`` the
    inference-only parameters are left out: each trial sweeps them on validation."""

    def __init__(self, spec: SearchSpec, posthoc_inference: bool) -> None:
        self.params = {k: v for k, v in spec.params.items() if not (posthoc_inference and k in INFERENCE_PARAMS)}

    def __call__(self, trial: Any) -> None:
        values: dict[str, Any] = {}
        for name, p in self.params.items():
            if p.when and any(values.get(k) != v for k, v in p.when.items()):
                continue
            if p.type == "categorical":
                values[name] = trial.suggest_categorical(name, p.choices)
            elif p.type == "int":
                step = int(p.step) if p.step else 1
                values[name] = trial.suggest_int(name, int(p.low), int(p.high), step=step, log=p.log)  # type: ignore[arg-type]
            else:
                log = p.type == "loguniform" or p.log
                values[name] = trial.suggest_float(name, p.low, p.high, log=log, step=None if log else p.step)


def chosen_values(sampled: dict[str, Any], metrics: dict[str, Any], posthoc: bool) -> dict[str, Any]:
    """A chosen configuration's dotted config values: its sampled ones, plus with ``posthoc`` its grid point."""
    if not posthoc:
        return {**sampled}
    from dedn.evaluation import inference_point  # torch: only for posthoc

    return {**sampled, **{f"inference.{k}": v for k, v in inference_point(metrics, "grid_").items()}}


def sampled_params(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's config minus Tune's own keys: the sampled dotted training-config values."""
    return {k: v for k, v in config.items() if "." in k}
