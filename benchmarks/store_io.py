"""Feature-store memory and speed: load peak RSS vs feature bytes, conversion peak RSS vs input size,
read throughput.

Each measurement runs in a fresh subprocess, so its peak RSS (VmHWM) is its own; "extra" is the
peak minus the RSS right after imports.

    python benchmarks/store_io.py                 # ~1.1 GB store, 0.3 and 1.2 GB HDF5/.mat inputs
    python benchmarks/store_io.py --scale 0.25    # quicker, smaller files
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, make_tables


def _child(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: VmRSS now, or VmHWM, the peak (not ru_maxrss: Linux
    carries ru_maxrss across fork+exec from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(kind: str, args: list[str]) -> None:
    import pyarrow  # noqa: F401  (imports count toward the baseline, not the measurement)

    from dedn.data import open_store
    from dedn.data.convert import convert_hdf5, convert_xlsa17

    base = _status_mb("VmRSS")
    t = time.perf_counter()
    result: dict = {}
    if kind == "load":
        s = open_store(args[0])
        f = s.features()
        result = {"feature_mb": f.nbytes / 2**20}
    elif kind == "blocks":
        s = open_store(args[0])
        n = sum(b.nbytes for b in s.iter_feature_blocks())
        result = {"feature_mb": n / 2**20}
    elif kind == "hdf5":
        convert_hdf5(args[0], args[1], att_splits=None, chunk_rows=int(args[2]), overwrite=True, dtype="float32")
    elif kind == "xlsa17":
        convert_xlsa17(args[0], args[1], args[2], chunk_rows=int(args[3]), overwrite=True, dtype="float32")
    result.update(seconds=time.perf_counter() - t, base_mb=base, peak_mb=_status_mb("VmHWM"))
    print(json.dumps(result))


def make_store(path: Path, n: int, shape: tuple[int, int, int]) -> None:
    from dedn.data.store import StoreWriter

    classes, attributes = make_tables()
    rng = np.random.default_rng(0)
    k = len(classes.names)
    labels = np.arange(n) % k
    # class 0 val-unseen, class k-1 unseen: the split rules common.make_tables describes
    splits = np.where(labels == 0, 2, np.where(labels == k - 1, 4, np.where(np.arange(n) % 5 == 0, 3, 0)))
    with StoreWriter(
        path, name="bench", classes=classes, attributes=attributes, shape=shape, dtype="float32", overwrite=True
    ) as w:
        for s in range(0, n, 1024):
            e = min(n, s + 1024)
            w.write(rng.random((e - s, *shape), dtype=np.float32), labels[s:e], splits[s:e])


def make_hdf5(path: Path, n: int, shape: tuple[int, int, int], att_k: int = 4, d: int = 3) -> None:
    import h5py

    rng = np.random.default_rng(0)
    labels = np.arange(n) % att_k
    idx = np.arange(n)
    with h5py.File(path, "w") as f:
        fm = f.create_dataset("feature_map", (n, *shape), dtype="f4", chunks=(min(64, n), *shape))
        for s in range(0, n, 1024):
            fm[s : s + 1024] = rng.random((min(1024, n - s), *shape), dtype=np.float32)
        f["labels"] = labels
        f["trainval_loc"] = idx[labels < att_k - 1]
        f["test_seen_loc"] = np.array([], dtype=np.int64)
        f["test_unseen_loc"] = idx[labels == att_k - 1]
        f["att"] = rng.random((att_k, d))
        f["w2v_att"] = rng.random((d, 5))


def make_mat(folder: Path, n: int, c: int, compress: bool) -> None:
    import scipy.io

    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    idx = np.arange(n) + 1
    cell = np.empty((4, 1), dtype=object)
    cell[:, 0] = [f"c{i}" for i in range(4)]
    scipy.io.savemat(
        folder / "att_splits.mat",
        {
            "att": rng.random((3, 4)),
            "original_att": rng.random((3, 4)),
            "allclasses_names": cell,
            "trainval_loc": idx[labels < 3].reshape(-1, 1),
            "test_seen_loc": np.zeros((0, 1)),
            "test_unseen_loc": idx[labels == 3].reshape(-1, 1),
        },
    )
    scipy.io.savemat(
        folder / "res101.mat",
        {"features": rng.random((c, n)), "labels": (labels + 1).reshape(-1, 1)},
        do_compression=compress,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="dedn-bench-"))
    shape = (256, 7, 7)  # 50 KB per image in float32
    n_store = int(22_000 * a.scale)
    make_store(tmp / "store", n_store, shape)
    rows = []
    load = _child("load", str(tmp / "store"))
    blocks = _child("blocks", str(tmp / "store"))
    rows.append(("load store -> one (N,C,H,W) array", load["feature_mb"], load))
    rows.append(("stream row groups (no copy kept)", blocks["feature_mb"], blocks))
    conv = []
    for frac in (0.25, 1.0):
        n = int(6000 * a.scale * frac)
        make_hdf5(tmp / "in.h5", n, (512, 7, 7))
        size = os.path.getsize(tmp / "in.h5") / 2**20
        r = _child("hdf5", str(tmp / "in.h5"), str(tmp / "out_h5"), "256")
        conv.append((f"hdf5 {n} x 512x7x7, chunk 256 (24.5 MB)", size, r))
        (tmp / "in.h5").unlink()
    for compress in (False, True):
        n = int(60_000 * a.scale)
        make_mat(tmp, n, 2048, compress)
        size = os.path.getsize(tmp / "res101.mat") / 2**20
        r = _child("xlsa17", str(tmp / "att_splits.mat"), str(tmp / "res101.mat"), str(tmp / "out_mat"), "2048")
        conv.append((f"res101.mat 2048 x {n} f64{' zlib' if compress else ''}, chunk 2048 (32 MB)", size, r))
    print("\nFeature store I/O  (python benchmarks/store_io.py --scale", a.scale, ")")
    print(f"{'operation':<48} {'data MB':>9} {'peak RSS MB':>12} {'extra MB':>9} {'extra/data':>10} {'MB/s':>8}")
    for name, mb, r in rows + conv:
        extra = r["peak_mb"] - r["base_mb"]
        print(
            f"{name:<48} {mb:>9.0f} {r['peak_mb']:>12.0f} {extra:>9.0f} {extra / mb:>10.2f} {mb / r['seconds']:>8.0f}"
        )
    print("extra = peak RSS - RSS after imports; for conversions 'data MB' is the input file size")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3:])
    else:
        sys.path.insert(0, str(ROOT))
        main()
