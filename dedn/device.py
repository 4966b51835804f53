"""The one device setting (``auto|cpu|cuda``) and the training step's precision and compilation.

``resolve_device`` turns the config's device into a ``torch.device``; ``use_bf16`` decides whether the
matrix products run in bf16 autocast (a GPU, or a CPU with native bf16); ``compiled`` wraps a step
function in ``torch.compile`` when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from dedn.config import TrainConfig
from dedn.errors import DednInputError

Fn = TypeVar("Fn", bound=Callable[..., Any])


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DednInputError("config", "device", "cuda was asked for but no CUDA device is available")
    return torch.device(name)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the matrix products: ``precision`` bf16, or auto on a GPU. The CPU needs native
    bf16 instructions (AVX512-BF16 or AMX), else it falls back to float32."""
    if cfg.precision == "float32":
        return False
    if device.type == "cuda":
        return True
    return cfg.precision == "bf16" and cpu_supports_bf16()


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively: AVX512-BF16 (Cooper Lake, Sapphire Rapids and
    later, AMD Zen 4 and later) or AMX, and oneDNN takes the bf16 path. oneDNN's own check
    (``_is_mkldnn_bf16_supported``) is only "AVX-512 core": true on Skylake/Cascade Lake too, where bf16
    GEMMs are emulated and slower than float32."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compiled(fn: Fn, enabled: bool) -> Fn:
    """``torch.compile(fn)`` when enabled (first steps pay the compile time), else ``fn``."""
    if not enabled:
        return fn
    return cast(Fn, torch.compile(fn, dynamic=False))


__all__ = ["compiled", "cpu_supports_bf16", "resolve_device", "use_bf16"]
