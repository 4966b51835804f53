"""The image trunk of the released DEDN preprocessing: torchvision's ResNet-101 without its average pooling and
classifier, defined here with torchvision's parameter names so its weight files (``resnet101-63fe2227.pth``, what
``pretrained=True`` loads) load with ``strict=True`` once their ``fc.`` entries are set aside.

Images are prepared as torchvision's ``Resize(size)`` (shorter side to ``size``, the longer scaled and truncated to
an integer, bilinear) then ``CenterCrop(size)`` (offsets rounded with Python's ``round``), ``ToTensor`` and ImageNet
``Normalize`` do on PIL images; any mode (grayscale, RGBA, CMYK, palette) is converted to RGB first."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dedn.errors import DednInputError

WEIGHTS_FILE = "resnet101-63fe2227.pth"  # torchvision's ResNet101_Weights.IMAGENET1K_V1
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what Pillow may open: no format that runs a program
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")  # converted to RGB
MAX_PIXELS = 64_000_000  # larger pictures are refused from their header, before any decoding
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LAYERS = (3, 4, 23, 3)  # bottleneck blocks per stage of ResNet-101
CHANNELS = 2048


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3x3 convolution, ResNet v1.5)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetTrunk(nn.Module):
    """ResNet-101 up to ``layer4``: images (N, 3, S, S) -> feature maps (N, 2048, S/32, S/32)."""

    def __init__(self, layers: tuple[int, ...] = LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, 2 if b == 0 and i > 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def default_weights_path() -> Path:
    """Where torch keeps torchvision's ResNet-101 weights: ``$TORCH_HOME/hub/checkpoints/resnet101-63fe2227.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ImageError(ValueError):
    """A picture that is not taken; the message is the rule it breaks (the caller names the file or request row)."""


def open_image(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> Any:
    """A picture (encoded bytes or a file) decoded by Pillow, refused with an ImageError before decoding when its
    format is not one of IMAGE_FORMATS, it has more than MAX_PIXELS pixels, or its mode is not one of IMAGE_MODES,
    and when it cannot be decoded whole (a truncated file)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    fp = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray | memoryview) else source
    limit = f"over the limit of {MAX_PIXELS // 1_000_000} megapixels"
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 megapixels: the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"more than twice 89 megapixels: {limit}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a picture in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:
        raise ImageError(f"cannot be read: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise ImageError(f"{w}x{h} pixels is {limit}")
    if img.mode not in IMAGE_MODES:
        img.close()
        raise ImageError(f"mode {img.mode!r} is not supported ({', '.join(IMAGE_MODES)})")
    try:
        img.load()  # decode now: a truncated file fails here, not later
    except Exception as e:
        img.close()
        raise ImageError(f"cannot be decoded: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    return img


def load_trunk_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A ResNet-101 state_dict from ``path`` (``torch.load(weights_only=True)`` or safetensors), checked against the
    trunk (``strict=True``; ``fc.*`` set aside): one DednInputError naming the file when absent or of another
    architecture. Never downloads."""
    p = Path(path)
    if not p.is_file():
        where = default_weights_path()
        raise DednInputError(
            p,
            "weights",
            f"not found; put torchvision's ResNet-101 ImageNet weights ({WEIGHTS_FILE}) at {where} or pass "
            "--weights FILE (nothing is downloaded)",
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # not a weights file, or one that would run code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DednInputError(p, "weights", f"not a readable state_dict ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DednInputError(p, "weights", "must be a state_dict of tensors")
    trunk = {k: v for k, v in state.items() if not str(k).startswith("fc.")}
    want = ResNetTrunk().state_dict()
    missing, unexpected = sorted(set(want) - set(trunk)), sorted(set(trunk) - set(want))
    wrong = [k for k in want if k in trunk and tuple(trunk[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        why = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape (first: {first})"
        raise DednInputError(p, "weights", f"not a torchvision ResNet-101 state_dict: {why}")
    return trunk


def build_trunk(state: dict[str, torch.Tensor]) -> ResNetTrunk:
    """The trunk in eval mode with ``state`` loaded (``strict=True``)."""
    trunk = ResNetTrunk()
    trunk.load_state_dict(state, strict=True)
    return trunk.eval()


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output (width, height): the shorter side ``size``, the longer truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def prepare_image(img: Any, size: int) -> np.ndarray:
    """A PIL image as the trunk takes it: RGB, resized, centre-cropped to ``size`` x ``size``, scaled to [0, 1] and
    normalised with ImageNet's mean and std: float32 (3, size, size)."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    nw, nh = resized_size(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
    y = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return np.ascontiguousarray(y.transpose(2, 0, 1), dtype=np.float32)


def preprocessing(size: int) -> str:
    """The preprocessing recorded with an extracted store."""
    return (
        f"RGB; resize shorter side to {size} (bilinear, torchvision Resize); centre crop {size}x{size}; "
        f"scale to [0, 1]; normalise mean {list(MEAN)} std {list(STD)}"
    )


__all__ = [
    "CHANNELS",
    "LAYERS",
    "MEAN",
    "STD",
    "WEIGHTS_FILE",
    "ResNetTrunk",
    "Bottleneck",
    "IMAGE_FORMATS",
    "IMAGE_MODES",
    "ImageError",
    "MAX_PIXELS",
    "build_trunk",
    "default_weights_path",
    "load_trunk_weights",
    "open_image",
    "prepare_images",
    "prepare_image",
    "preprocessing",
    "resized_size",
    "sha256_file",
]


def prepare_images(sources: list[Any], size: int) -> tuple[np.ndarray, list[str]]:
    """Each picture (encoded bytes or a file) decoded and prepared (``open_image``, ``prepare_image``): float32
    (N, 3, size, size), and per picture "" or the rule it breaks (its pixels then zeros)."""
    pixels = np.zeros((len(sources), 3, size, size), dtype=np.float32)
    errors = []
    for j, source in enumerate(sources):
        try:
            with open_image(source) as img:
                pixels[j] = prepare_image(img, size)
            errors.append("")
        except ImageError as e:  # unreadable, truncated, too large, a mode or format not taken
            errors.append(str(e))
    return pixels, errors
