"""Synthetic images in the xlsa17 layout for the extraction tests: PIL-drawn pictures (JPEG and PNG, odd sizes,
grayscale, RGBA, CMYK, palette) under ``images/CUB_200_2011/images/<class>/``, an ``att_splits.mat`` of six classes
(two unseen), ``image_labels.csv``, and seeded random ResNet-101 weights saved as a plain state_dict; plus a reference
trunk written with ``torch.nn.functional`` calls only, applied image by image."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F

from dedn.trunk import LAYERS, MEAN, STD, ResNetTrunk

CLASSES = ("001.alpha", "002.beta", "003.gamma", "004.delta", "005.epsilon", "006.zeta")
UNSEEN = (4, 5)
MODES = ("RGB", "L", "RGBA", "CMYK", "P")


@dataclass
class ImageSet:
    root: Path  # --images
    image_list: Path  # image_labels.csv
    att_splits: Path
    weights: Path
    files: list[str]  # as listed, relative to root
    labels: np.ndarray  # 0-based


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ResNet-101 state_dict with torchvision's names (``fc.`` included), seeded, with batch-norm statistics and
    scales that keep activations within float16 range through the 33 blocks."""
    torch.manual_seed(seed)
    trunk = ResNetTrunk()
    g = torch.Generator().manual_seed(seed)
    for name, m in trunk.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.05)
            if name.endswith("bn3"):
                m.weight.data.mul_(0.2)
    state = trunk.state_dict()
    state["fc.weight"] = torch.randn(1000, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


def make_images(folder: Path, per_class: int = 8, seed: int = 0, prefix: str = "CUB_200_2011/images") -> ImageSet:
    """``per_class`` pictures per class of every mode and odd sizes, the split file and the weights."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = folder / "images"
    files: list[str] = []
    labels: list[int] = []
    for k, cls in enumerate(CLASSES):
        (root / prefix / cls).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = int(rng.integers(40, 130)), int(rng.integers(40, 130))
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(4):
                x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
                box = (x0, y0, x0 + int(rng.integers(4, w - x0)), y0 + int(rng.integers(4, h - y0)))
                draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            mode = MODES[(k + j) % len(MODES)]
            img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
            ext = "png" if mode in ("RGBA", "P") or j % 3 == 0 else "jpg"
            if mode == "CMYK":
                ext = "jpg"
            name = f"{prefix}/{cls}/img_{k}_{j}.{ext}"
            img.save(root / name, quality=90) if ext == "jpg" else img.save(root / name)
            files.append(name)
            labels.append(k)
    lab = np.asarray(labels)
    image_list = folder / "image_labels.csv"
    with image_list.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image_file", "label"])
        wr.writerows((n, int(k) + 1) for n, k in zip(files, lab, strict=True))
    idx = np.arange(lab.size)
    unseen = np.isin(lab, UNSEEN)
    seen_idx = idx[~unseen]
    test_seen = seen_idx[rng.random(seen_idx.size) < 0.25]
    trainval = np.setdiff1d(seen_idx, test_seen)
    att = rng.random((len(CLASSES), 12))
    names = np.empty((len(CLASSES), 1), dtype=object)
    names[:, 0] = list(CLASSES)
    att_splits = folder / "att_splits.mat"
    scipy.io.savemat(
        att_splits,
        {
            "att": att.T,
            "original_att": att.T * 100,
            "allclasses_names": names,
            "trainval_loc": (trainval + 1).reshape(-1, 1),
            "test_seen_loc": (test_seen + 1).reshape(-1, 1),
            "test_unseen_loc": (idx[unseen] + 1).reshape(-1, 1),
        },
    )
    weights = folder / "weights.pth"
    torch.save(random_weights(seed), weights)
    return ImageSet(root, image_list, att_splits, weights, files, lab)


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
