"""Object-store bytes per node for the CUB, SUN and AWA2 feature maps (float16, 2048 channels x 14 x 14).

1. Image counts come from the real benchmark files in ``../shared/data/zsl`` (or ``$DEDN_ZSL_DATA``, or
   ``--zsl``), read with dedn.data.benchmark_files.read_benchmark: N is the number of rows of
   ``image_labels.csv``; the standard splits are the ``*_loc`` lists of ``att_splits.mat``; the search's
   ``train`` role (trainval minus val_seen and val_unseen) is built with dedn.data.splits.assign_splits as
   ``dedn data convert`` does (valclasses1.txt, seed 0, val_fraction 0.2). Without the folder the published
   counts are used (CUB 11,788; SUN 14,340; AWA2 37,322) and the table says so.
   Raw bytes = N x C x H x W x 2.
2. A local Ray instance (started like ``dedn search`` does, cluster.connect.ray_session: 127.0.0.1, no dashboard,
   1 CPU) gets float16 arrays of whole images of scaled-down sizes (``--mb``) with ``ray.put``, all kept alive,
   the way cluster.objects.share_store puts a store's features. For each put it records what the object store
   accounts (the drop of ``ray.available_resources()["object_store_memory"]``) and what the kernel reports
   (growth of ``Shmem`` in /proc/meminfo), and checks that a task on the node reads the object as a zero-copy
   view. The measured ratio of stored to raw bytes is then applied to the full datasets.

    python benchmarks/object_store_bytes.py                 # puts of 64, 256, 512 MB
    python benchmarks/object_store_bytes.py --mb 128 1024 --zsl /path/to/zsl
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT

DATASETS = ("CUB", "SUN", "AWA2")
PUBLISHED = {"CUB": 11788, "SUN": 14340, "AWA2": 37322}


def shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def image_counts(folder: Path, name: str) -> dict[str, Any]:
    """Images per role of one dataset, from its real benchmark files."""
    from dedn.data.benchmark_files import read_benchmark
    from dedn.data.splits import SPLITS, TEST_UNSEEN, assign_splits, standard_from_locs

    bm = read_benchmark(folder / name)
    if bm.labels is None:
        raise FileNotFoundError(f"{folder / name}: no image_labels.csv, so no image list")
    labels = bm.labels
    locs = bm.split_file.locs
    standard = standard_from_locs(labels.size, locs, str(folder / name))
    seen = np.ones(bm.num_classes, dtype=bool)
    seen[labels[standard == TEST_UNSEEN]] = False
    roles, _ = assign_splits(labels, standard, seen, val_unseen_classes=bm.val_classes, seed=0, source=name)
    counts = {role: int((roles == i).sum()) for i, role in enumerate(SPLITS)}
    return {
        "images": int(labels.size),
        "in_splits": int((standard >= 0).sum()),
        "trainval": int(locs["trainval"].size),
        "test_seen": int(locs["test_seen"].size),
        "test_unseen": int(locs["test_unseen"].size),
        "train": counts["train"],
        "source": "benchmark files",
    }


def wait_for_change(before: float, timeout_s: float = 10.0) -> float:
    """``object_store_memory`` available once it has moved from ``before`` and settled (it is reported
    periodically, so it lags a put by up to about a second)."""
    import ray

    t0, last = time.perf_counter(), before
    while time.perf_counter() - t0 < timeout_s:
        time.sleep(0.25)
        now = float(ray.available_resources().get("object_store_memory", 0.0))
        if now != before and now == last:
            return now
        last = now
    return last


def measure_puts(sizes_mb: list[int], image_bytes: int, shape: tuple[int, ...]) -> list[dict[str, float]]:
    import ray

    from cluster.connect import ray_session
    from cluster.objects import is_object_store_view

    @ray.remote(num_cpus=0.01)
    def reads_zero_copy(box: list[Any]) -> bool:
        return is_object_store_view(ray.get(box[0]))

    total = sum(sizes_mb) * 2**20
    rows = []
    with ray_session(num_cpus=1, object_store_memory=int(total * 1.1 + 256 * 2**20)):
        time.sleep(2)
        keep = []  # every put stays alive, so each one needs fresh pages
        for mb in sorted(sizes_mb):
            n = max(1, round(mb * 2**20 / image_bytes))
            arr = np.empty((n, *shape), dtype=np.float16)
            arr[:] = 1.0  # touch every page
            avail0 = float(ray.available_resources()["object_store_memory"])
            shm0 = shmem_bytes()
            t0 = time.perf_counter()
            ref = ray.put(arr)
            put_s = time.perf_counter() - t0
            avail1 = wait_for_change(avail0)
            shm1 = shmem_bytes()
            zero_copy = ray.get(reads_zero_copy.remote([ref]))
            keep.append(ref)
            rows.append(
                {
                    "images": n,
                    "raw": float(arr.nbytes),
                    "put_s": put_s,
                    "store": avail0 - avail1,
                    "shm": float(shm1 - shm0),
                    "zero_copy": float(zero_copy),
                }
            )
            del arr
            r = rows[-1]
            print(
                f"  put {r['raw'] / 1e6:.0f} MB: store accounts {r['store'] / 1e6:.1f} MB, Shmem +{r['shm'] / 1e6:.1f}"
                f" MB, {put_s:.2f} s, zero-copy read {bool(zero_copy)}",
                flush=True,
            )
    return rows


def main() -> None:
    """Parse the options, measure every row, print the table. Over 80 lines on purpose: a benchmark's main
    is one straight script, so each printed row sits next to the code that measured it."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[64, 256, 512], help="sizes of the measured puts (MiB)")
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--side", type=int, default=14, help="feature map side: H = W")
    ap.add_argument(
        "--zsl", default=None, help="folder with CUB/ SUN/ AWA2/ (default: $DEDN_ZSL_DATA or ../shared/data/zsl)"
    )
    a = ap.parse_args()
    zsl = Path(a.zsl or os.environ.get("DEDN_ZSL_DATA") or ROOT.parent / "shared" / "data" / "zsl")
    shape = (a.channels, a.side, a.side)
    image_bytes = int(np.prod(shape)) * 2

    counts: dict[str, dict[str, Any]] = {}
    for name in DATASETS:
        if (zsl / name / "att_splits.mat").is_file():
            counts[name] = image_counts(zsl, name)
        else:
            counts[name] = {"images": PUBLISHED[name], "source": "published count (benchmark files not found)"}
    rows = measure_puts(a.mb, image_bytes, shape)
    ratio = max(rows, key=lambda r: r["raw"])
    store_ratio = ratio["store"] / ratio["raw"]
    shm_ratio = ratio["shm"] / ratio["raw"]

    print(
        f"\nMeasured: ray.put of float16 arrays of whole images ({a.channels} x {a.side} x {a.side}, {image_bytes:,} B each)"
    )
    print(
        f"{'raw MB':>8} {'images':>7} {'store MB':>9} {'store-raw B':>12} {'Shmem MB':>9} {'Shmem-raw B':>12} "
        f"{'put s':>6} {'GB/s':>6} {'zero-copy read':>15}"
    )
    for r in rows:
        print(
            f"{r['raw'] / 1e6:>8.1f} {r['images']:>7} {r['store'] / 1e6:>9.1f} {r['store'] - r['raw']:>12,.0f} "
            f"{r['shm'] / 1e6:>9.1f} {r['shm'] - r['raw']:>12,.0f} {r['put_s']:>6.2f} {r['raw'] / r['put_s'] / 1e9:>6.2f} "
            f"{'yes' if r['zero_copy'] else 'no':>15}"
        )
    print(
        "store MB = drop of ray.available_resources()['object_store_memory']; Shmem MB = growth of Shmem in "
        "/proc/meminfo (pages the kernel holds). MB = 10^6 bytes."
    )

    print(
        f"\nPer node: one copy of a dataset's features in the object store ({a.channels} x {a.side} x {a.side} float16; "
        f"bytes = N x {image_bytes:,}); stored = raw x {store_ratio:.4f} (measured store/raw of the largest put)"
    )
    has_splits = all("trainval" in c for c in counts.values())
    split_head = f" {'trainval':>8} {'train':>6}" if has_splits else ""
    print(f"{'dataset':<8} {'images N':>9}{split_head} {'raw GB':>8} {'raw GiB':>8} {'stored GB':>10}  source of N")
    tot_raw = 0.0
    for name in DATASETS:
        c = counts[name]
        raw = c["images"] * image_bytes
        tot_raw += raw
        splits = f" {c['trainval']:>8,} {c['train']:>6,}" if has_splits else ""
        print(
            f"{name:<8} {c['images']:>9,}{splits} {raw / 1e9:>8.2f} {raw / 2**30:>8.2f} {raw * store_ratio / 1e9:>10.2f}"
            f"  {c['source']}"
        )
    pad = " " * 16 if has_splits else ""
    n_all = sum(c["images"] for c in counts.values())
    print(
        f"{'all 3':<8} {n_all:>9,}{pad} {tot_raw / 1e9:>8.2f} {tot_raw / 2**30:>8.2f} {tot_raw * store_ratio / 1e9:>10.2f}"
        "  a node that serves all three datasets at once"
    )
    if has_splits:
        print(
            "trainval = standard seen-class training images (att_splits.mat); train = what a search trial trains on "
            "(trainval minus val_seen and val_unseen). The store holds all N images (test splits included)."
        )
        for name in DATASETS:
            c = counts[name]
            print(
                f"  {name}: trainval {c['trainval']:,} + test_seen {c['test_seen']:,} + test_unseen "
                f"{c['test_unseen']:,} = {c['in_splits']:,} of {c['images']:,} images"
            )
    print(f"Largest put: store/raw {store_ratio:.6f}, Shmem/raw {shm_ratio:.6f}.")
    cmd = f"python benchmarks/object_store_bytes.py --mb {' '.join(map(str, a.mb))}"
    if a.channels != 2048 or a.side != 14:
        cmd += f" --channels {a.channels} --side {a.side}"
    if a.zsl:
        cmd += f" --zsl {a.zsl}"
    print(f"({cmd})")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
