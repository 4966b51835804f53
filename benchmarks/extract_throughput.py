"""Images/s and peak resident memory of feature extraction: the released preprocessing's approach (a DataLoader and
the trunk, every feature map kept in memory, then one HDF5 write) against ``dedn data extract`` (Ray Data, shards
written as they come), on the same synthetic images, at 1x and 4x the image count.

Peak memory is the largest sum of the proportional set size (PSS: resident memory, pages shared between processes,
such as Ray's object store, divided among them) of the command's process tree (the driver and, for ours, the local
Ray instance and its workers), sampled every 0.2 s. Both use the same trunk, weights (seeded random: no
download) and preprocessing.

    python benchmarks/extract_throughput.py --images 100 --size 224
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from common import ROOT

CLASSES = 4


def make_set(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """``n`` JPEG pictures of odd sizes over four classes (the last unseen), their CSV list, att_splits.mat, weights."""
    import csv

    import scipy.io
    import torch
    from PIL import Image

    from dedn.trunk import ResNetTrunk

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = i % CLASSES
        name = f"CUB_200_2011/images/c{k}/img{i}.jpg"
        (folder / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(240, 400, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / name, quality=85)
        rows.append((name, k + 1))
    with (folder / "images.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image_file", "label"), *rows])
    labels = np.asarray([k - 1 for _, k in rows])
    idx = np.arange(n)
    unseen = labels == CLASSES - 1
    test_seen = idx[~unseen][::4]
    names = np.empty((CLASSES, 1), dtype=object)
    names[:, 0] = [f"c{k}" for k in range(CLASSES)]
    scipy.io.savemat(
        folder / "att_splits.mat",
        {
            "att": rng.random((6, CLASSES)),
            "allclasses_names": names,
            "trainval_loc": (np.setdiff1d(idx[~unseen], test_seen) + 1).reshape(-1, 1),
            "test_seen_loc": (test_seen + 1).reshape(-1, 1),
            "test_unseen_loc": (idx[unseen] + 1).reshape(-1, 1),
        },
    )
    torch.manual_seed(seed)
    torch.save(ResNetTrunk().state_dict(), folder / "weights.pth")
    return folder / "images.csv", folder / "att_splits.mat", folder / "weights.pth"


def authors(folder: Path, size: int, batch_size: int) -> None:
    """The released approach, as a child process: DataLoader, trunk, every map appended to a list, one HDF5 file."""
    import csv

    import h5py
    import torch
    from PIL import Image

    from dedn.trunk import build_trunk, load_trunk_weights, prepare_image

    with (folder / "images.csv").open() as f:
        rows = list(csv.DictReader(f))

    class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(folder / "images" / rows[i]["image_file"]) as img:
                return torch.from_numpy(prepare_image(img, size))

    trunk = build_trunk(load_trunk_weights(folder / "weights.pth"))
    maps = []
    with torch.inference_mode():
        for x in torch.utils.data.DataLoader(Images(), batch_size=batch_size, num_workers=1):
            maps.append(trunk(x).numpy())
    with h5py.File(folder / "features.hdf5", "w") as h5:
        h5["feature_map"] = np.concatenate(maps)
        h5["labels"] = np.asarray([int(r["label"]) - 1 for r in rows])


def peak_rss(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak bytes of the process tree's PSS) of running ``argv``."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    top = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):  # the command ended, or one of its processes did
                for p in [top, *top.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_full_info().pss
            peak = max(peak, total)
            time.sleep(0.2)

    start = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed:\n{err.decode()[-2000:]}")
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100, help="image count at 1x")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        authors(Path(args.child), args.size, args.batch_size)
        return
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({psutil.cpu_count()} cores)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp:
        for factor in (1, 4):
            folder = Path(tmp) / f"x{factor}"
            n = args.images * factor
            image_list, att_splits, weights = make_set(folder, n)
            theirs = [sys.executable, __file__, "--child", str(folder), "--size", str(args.size)]
            theirs += ["--batch-size", str(args.batch_size)]
            ours = [sys.executable, "-c", "from cli.main import main; main()", "data", "extract", "--images"]
            ours += [str(folder / "images"), "--image-list", str(image_list), "--att-splits", str(att_splits)]
            ours += ["--weights", str(weights), "--size", str(args.size), "--out", str(folder / "store")]
            ours += ["--dtype", "float32", "--batch-size", str(args.batch_size)]
            for name, argv in (("released approach", theirs), ("dedn data extract", ours)):
                seconds, peak = peak_rss(argv)
                rows.append((name, factor, n, n / seconds, peak))
    print(f"\nfeature extraction, {args.size} px, trunk ResNet-101, device {device}\n")
    print(f"| {'approach':<18} | images | images/s | peak memory (PSS)    | vs 1x |")
    print(f"|{'-' * 20}|--------|----------|----------------------|-------|")
    first = {name: peak for name, factor, _, _, peak in rows if factor == 1}
    for name, _, n, rate, peak in rows:
        print(f"| {name:<18} | {n:>6} | {rate:>8.2f} | {peak / 2**20:>17.0f} MB | {peak / first[name]:>5.2f} |")
    cmd = f"python benchmarks/extract_throughput.py --images {args.images} --size {args.size}"
    print(f"\nreproduce: {cmd}  (in {ROOT})")


if __name__ == "__main__":
    main()
