"""Drawn pictures for trying the picture path end to end without a dataset or ImageNet weights (``dedn data synth
--pictures``): six classes (two unseen) of PIL-drawn pictures, JPEG and PNG of odd sizes and every mode the
extraction converts (RGB, grayscale, RGBA, CMYK, palette), in the xlsa17 layout (``images/CUB_200_2011/images/<class>/``,
``image_labels.csv``, an ``att_splits.mat`` with random attributes), and seeded random ResNet-101 weights with
torchvision's names. The pictures carry no class signal a trunk would find: they exercise the machinery, not DEDN.
Same seed, same pictures, list, splits and weights."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dedn.trunk import ResNetTrunk

CLASSES = ("001.alpha", "002.beta", "003.gamma", "004.delta", "005.epsilon", "006.zeta")
UNSEEN = (4, 5)
MODES = ("RGB", "L", "RGBA", "CMYK", "P")


@dataclass
class DrawnPictures:
    root: Path  # the --images folder
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
            assert m.running_mean is not None and m.running_var is not None
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


def draw_pictures(
    folder: Path,
    per_class: int = 8,
    seed: int = 0,
    prefix: str = "CUB_200_2011/images",
    weights_name: str = "weights.safetensors",
) -> DrawnPictures:
    """``per_class`` pictures per class, the list, the split file and the weights (``.safetensors`` or a ``.pth``
    state_dict, by ``weights_name``'s suffix) under ``folder``."""
    import scipy.io
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
    weights = folder / weights_name
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(random_weights(seed), str(weights))
    else:
        torch.save(random_weights(seed), weights)
    return DrawnPictures(root, image_list, att_splits, weights, files, lab)


__all__ = ["CLASSES", "DrawnPictures", "UNSEEN", "draw_pictures", "random_weights"]
