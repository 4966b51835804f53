"""Drawn pictures for the extraction and serving tests (``dedn.data.pictures``, the weights a plain state_dict), and a
reference trunk written with ``torch.nn.functional`` calls only, applied image by image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dedn.data.pictures import DrawnPictures, draw_pictures
from dedn.trunk import LAYERS, MEAN, STD

ImageSet = DrawnPictures


def make_images(folder: Path, per_class: int = 8, seed: int = 0, prefix: str = "CUB_200_2011/images") -> ImageSet:
    """``dedn.data.pictures.draw_pictures`` with the weights as a plain ``.pth`` state_dict (what torch's cache holds)."""
    return draw_pictures(folder, per_class, seed, prefix, weights_name="weights.pth")


def reference_pixels(path: Path, size: int) -> np.ndarray:
    """torchvision's Resize(size) + CenterCrop(size) + ToTensor + Normalize on a PIL image, written out: float32
    (3, size, size)."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # torchvision truncates the longer side
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    arr = np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    arr = (arr - np.float32(MEAN)) / np.float32(STD)
    return arr.transpose(2, 0, 1).copy()


def reference_trunk(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-101 up to layer4 from ``state`` with functional calls only (torchvision's layout, v1.5 strides)."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(
            t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"], state[f"{p}.bias"],
            False, 0.0, 1e-5,
        )  # fmt: skip

    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, blocks in enumerate(LAYERS):
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            stride = 2 if b == 0 and s > 0 else 1
            out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            short = x
            if f"{p}.downsample.0.weight" in state:
                short = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + short)
    return x


def reference_features(images: ImageSet, size: int, files: list[str]) -> np.ndarray:
    """The reference applied image by image: (n, 2048, h, w) float32."""
    state = torch.load(images.weights, weights_only=True)
    out = []
    with torch.inference_mode():
        for f in files:
            x = torch.from_numpy(reference_pixels(images.root / f, size))[None]
            out.append(reference_trunk(state, x)[0].numpy())
    return np.stack(out)
