"""Training configuration: YAML files under ``configs/``, validated once into frozen pydantic models.

``load_config(path, overrides=["optim.lr=3e-4", ...])`` reads the YAML, applies ``key=value``
overrides (values parsed as YAML), and validates. Unknown keys and wrong types fail at once, every
error reported together in one DednInputError line naming the file.
"""

from __future__ import annotations

import contextvars
import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dedn.errors import DednInputError, DednInputErrors
from dedn.safe_yaml import load_mapping, parse_yaml

SelectOn = Literal[
    "configured", "grid"
]  # which H picks a run's best epoch: the config's inference point or the grid's best
ABLATIONS = ("none", "no_distill", "cexp_only", "fexp_only", "no_channel_attention", "no_mal", "no_align")


_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("_DEPTH", default=0)  # sections being built


class _Frozen(BaseModel):
    """A frozen config section; built in Python (not through ``validate_config``) a bad value raises
    DednInputErrors naming the section, like a bad YAML file does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        depth = _DEPTH.set(_DEPTH.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as e:
            if _DEPTH.get() > 1:  # nested in another section, or inside validate_config: its caller reports
                raise
            raise DednInputErrors(type(self).__name__, _error_list(e)) from None
        finally:
            _DEPTH.reset(depth)


class DataConfig(_Frozen):
    store: str = Field(description="Feature-store folder (dedn data synth/convert).")


class ModelSection(_Frozen):
    clusters: str | list[list[int]] = Field(
        "manual",
        description="Fine-expert partition: a store preset (manual, half), 'kmeans' (with kmeans_q), "
        "'single' (one cluster), 'singletons', or explicit lists of attribute indices.",
    )
    kmeans_q: int | None = Field(None, ge=1)
    use_cexp: bool = True
    use_fexp: bool = True
    channel_attention: bool = True
    normalize_features: bool = True
    low_rank_hidden: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _kmeans_needs_q(self) -> ModelSection:
        if self.clusters == "kmeans" and self.kmeans_q is None:
            raise ValueError("clusters 'kmeans' needs kmeans_q")
        if not (self.use_cexp or self.use_fexp):
            raise ValueError("at least one of use_cexp/use_fexp must be true")
        return self


class LossConfig(_Frozen):
    """The loss of eq. 18: ``mal`` False is plain cross-entropy; beta weighs L_align, gamma L_distill, eps is
    MAL's margin. ``distance`` is d(x, y)'s squared-error term (see ``dedn.losses.pair_distance``); None
    resolves by ``fidelity``. ``fidelity`` released also distils the calibrated scores P + c s, as the
    released code does. ``mal_variant`` paper: z_y = P_y - 2 eps (released CUB); released: z_y = P_y - eps
    (SUN/AWA2). ``lambda_cal`` > 0 adds DAZLE's self-calibration loss with ``calibration`` c."""

    mal: bool = True
    beta: float = Field(0.001, ge=0)
    gamma: float = Field(0.1, ge=0)
    eps: float = Field(1.0, ge=0)
    fidelity: Literal["paper", "released"] = "paper"
    distance: Literal["mse", "sum", "released"] | None = Field(
        None,
        description="Squared-error term of d(x, y) in L_align and L_distill: mse (mean over the vector, the "
        "paper's words), sum (eq. 7/12 as typeset), released (the authors' cubic term); None: mse under "
        "fidelity paper, released under fidelity released.",
    )
    mal_variant: Literal["paper", "released"] = "paper"
    lambda_cal: float = Field(0.0, ge=0)
    calibration: float = 1.0

    @property
    def distance_term(self) -> Literal["mse", "sum", "released"]:
        """``distance``, resolved: mse under fidelity paper, released under fidelity released."""
        if self.distance is not None:
            return self.distance
        return "released" if self.fidelity == "released" else "mse"


class OptimSection(_Frozen):
    lr: float = Field(1e-4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(50, ge=1)
    epochs: int = Field(80, ge=1)
    balanced: bool = Field(False, description="Class-balanced batches (released code): one image per class.")


class InferenceSection(_Frozen):
    lambda_rc: float = Field(0.8, ge=0, le=1)
    lambda_e: float = Field(0.9, ge=0, le=1)
    calibration: float = 1.0
    grid_lambda_rc: list[float] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
    grid_lambda_e: list[float] = [0.1, 0.3, 0.5, 0.7, 0.9]
    grid_calibration: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    objective: str = Field(
        "H",
        description="What selects epochs, grid points and trials: H, AUSUC, or U@S>=x / S@U>=x (the most U whose "
        "point on the exact seen/unseen curve keeps S >= x, and the reverse).",
    )

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        from dedn.metrics import parse_objective

        parse_objective(v)
        return v.replace(" ", "")

    @field_validator("grid_lambda_rc", "grid_lambda_e")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= x <= 1 for x in v):
            raise ValueError("grid values must be non-empty and lie in [0, 1]")
        return v


class TrainConfig(_Frozen):
    """The resolved configuration of one training run."""

    data: DataConfig
    model: ModelSection = ModelSection()
    loss: LossConfig = LossConfig()
    optim: OptimSection = OptimSection()
    inference: InferenceSection = InferenceSection()
    fidelity: Literal["paper", "released"] = "paper"
    released: dict[str, Any] = Field(
        default_factory=dict, description="key=value overrides applied when fidelity is 'released'."
    )
    ablation: Literal[ABLATIONS] = "none"  # type: ignore[valid-type]
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32", "bf16"] = Field(
        "auto",
        description="Matrix products in bf16 autocast: auto = on a GPU only; bf16 = also on a CPU with native "
        "bf16 (else float32); float32 = never.",
    )
    compile: bool = Field(False, description="torch.compile the training step's forward and loss.")
    eval_batch_size: int = Field(512, ge=1)
    final_fit: bool = Field(True, description="Retrain on trainval for the chosen epochs and test once.")
    paper_protocol: bool = Field(True, description="Also report best-over-epochs test metrics (labelled).")

    def effective(self) -> TrainConfig:
        """Apply ``released`` overrides (fidelity released) and the ablation switch; returns a new config."""
        raw = self.model_dump()
        if self.fidelity == "released":
            raw["loss"]["fidelity"] = "released"
            for key, value in self.released.items():
                set_path(raw, key, value, "released")
        table: dict[str, dict[str, float | bool]] = {
            "none": {},
            "no_distill": {"loss.gamma": 0.0},
            "cexp_only": {"model.use_fexp": False},
            "fexp_only": {"model.use_cexp": False},
            "no_channel_attention": {"model.channel_attention": False},
            "no_mal": {"loss.mal": False},
            "no_align": {"loss.beta": 0.0},
        }
        for key, value in table[self.ablation].items():
            set_path(raw, key, value, "ablation")
        if raw["loss"].get("distance") is None:
            raw["loss"]["distance"] = LossConfig.model_validate(raw["loss"]).distance_term
        raw["released"] = {}
        raw["fidelity"] = "paper" if self.fidelity == "paper" else "released"
        return TrainConfig.model_validate(raw)


def set_path(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``value`` at the dotted key path of a raw config mapping, making sections as needed; a path
    through a non-section is refused naming ``source``."""
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise DednInputError(source, dotted, f"'{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str], source: str = "--set") -> list[tuple[str, Any]]:
    """``key.path=value`` strings -> (path, YAML-parsed value); a missing '=' is refused."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise DednInputError(source, item, "must be key=value (e.g. optim.lr=3e-4)")
        key, text = item.split("=", 1)
        if not key.strip():
            raise DednInputError(source, item, "must be key=value with a key before '=' (e.g. optim.lr=3e-4)")
        value = parse_yaml(text, source, key.strip()) if text.strip() else ""
        out.append((key.strip(), value))
    return out


def validate_config(raw: dict[str, Any], source: str) -> TrainConfig:
    """Validate a raw mapping; all problems reported together as one DednInputErrors."""
    depth = _DEPTH.set(_DEPTH.get() + 1)
    try:
        cfg = TrainConfig.model_validate(raw)
        cfg.effective()
        return cfg
    except ValidationError as e:
        raise DednInputErrors(source, _error_list(e)) from None
    finally:
        _DEPTH.reset(depth)


def _error_list(e: ValidationError) -> list[tuple[str, str]]:
    return [(".".join(str(p) for p in err["loc"]) or "config", err["msg"]) for err in e.errors()]


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate. Raises DednInputError(s)."""
    p = Path(path)
    raw = copy.deepcopy(load_mapping(p, "config"))  # bounded: size, encoding, alias bombs (dedn.safe_yaml)
    sets = parse_overrides(overrides or [])
    for key, value in sets:
        set_path(raw, key, value, f"{p} --set")
    try:
        return validate_config(raw, str(p))
    except DednInputErrors as e:
        if sets and all(_from_overrides(field, [key for key, _ in sets]) for field, _ in e.errors):
            raise DednInputErrors(f"{p} --set", e.errors) from None  # the file is fine: name the --set
        raise


def _from_overrides(field: str, keys: list[str]) -> bool:
    """Whether a validation error at ``field`` (dotted) is about a value some ``--set`` key put there."""
    return any(field == k or field.startswith(k + ".") or k.startswith(field + ".") for k in keys)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "ABLATIONS",
    "DataConfig",
    "InferenceSection",
    "LossConfig",
    "ModelSection",
    "OptimSection",
    "SelectOn",
    "TrainConfig",
    "dump_config",
    "load_config",
    "parse_overrides",
    "set_path",
    "validate_config",
]
