"""Resident memory of N concurrent trials that hold a store's features: served once through Ray's object
store (what ``dedn search`` does) against each trial reading the Parquet store itself.

Memory is the PSS (proportional set size: a page shared by k processes counts 1/k in each) that loading
adds to the trial processes, summed (each process's baseline after imports is subtracted). A copy per
trial shows as N x the feature bytes; one shared copy as at most 1 x (its pages are also mapped by the
driver and the object store itself, which take their share).

    python benchmarks/object_store_memory.py                 # 400 MB store, N = 1, 2, 4
    python benchmarks/object_store_memory.py --mb 1000 --trials 1 2 4 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from common import ROOT, make_tables


def shmem_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_store(path: Path, mb: int) -> None:
    from dedn.data.store import StoreWriter

    classes, attributes = make_tables()
    shape = (256, 7, 7)
    n = int(mb * 2**20 / (np.prod(shape) * 2))
    k = len(classes.names)
    labels = np.arange(n) % k
    splits = np.where(labels == 0, 2, np.where(labels == k - 1, 4, np.where(np.arange(n) % 5 == 0, 3, 0)))
    rng = np.random.default_rng(0)
    with StoreWriter(path, name="mem", classes=classes, attributes=attributes, shape=shape, dtype="float16") as w:
        for s in range(0, n, 2048):
            e = min(n, s + 2048)
            w.write(rng.random((e - s, *shape), dtype=np.float32), labels[s:e], splits[s:e])


def main() -> None:
    import ray

    from cluster.objects import share_store
    from dedn.data import open_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dedn-objmem-"))
    make_store(tmp / "store", a.mb)
    feature_mb = open_store(tmp / "store").meta.feature_bytes / 2**20

    @ray.remote(num_cpus=0.01)
    class Trial:
        """Holds the features the way a trial does, touching every page."""

        def ready(self) -> int:
            import cluster.objects  # noqa: F401  (imports belong to the baseline)
            import dedn.data  # noqa: F401

            return psutil.Process().pid

        def load(self, source):  # type: ignore[no-untyped-def]
            from dedn.data import open_store as _open

            self.store = source.materialize() if not isinstance(source, str) else _open(source)
            f = self.store.features()
            self.checksum = float(f[:, 0].astype(np.float64).sum()) + float(f.reshape(len(f), -1).max(1).sum())
            return psutil.Process().pid

    ray.init(
        num_cpus=max(a.trials) + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=int((a.mb * 1.5 + 200) * 2**20),
    )
    rows = []
    try:
        shared = share_store(open_store(tmp / "store"))
        time.sleep(1)
        for mode in ("object store", "Parquet per trial"):
            for n in a.trials:
                shm0 = shmem_mb()
                actors = [Trial.remote() for _ in range(n)]
                pids = ray.get([t.ready.remote() for t in actors])
                base = sum(psutil.Process(p).memory_full_info().pss for p in pids) / 2**20
                src = shared if mode == "object store" else str(tmp / "store")
                ray.get([t.load.remote(src) for t in actors])
                pss = sum(psutil.Process(p).memory_full_info().pss for p in pids) / 2**20
                rss = sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20
                rows.append((mode, n, rss, pss - base, shmem_mb() - shm0))
                for t in actors:
                    ray.kill(t)
                time.sleep(1)
    finally:
        ray.shutdown()
    print(f"\nN trials holding a {feature_mb:.0f} MB feature store (float16, C=256, 7x7); object store filled once")
    print(f"{'source':<20} {'N':>3} {'sum RSS MB':>11} {'added PSS MB':>13} {'added / features':>17}")
    for mode, n, rss, pss, _ in rows:
        print(f"{mode:<20} {n:>3} {rss:>11.0f} {pss:>13.0f} {pss / feature_mb:>17.2f}")
    print("PSS counts a page shared by k processes 1/k in each: one shared copy sums to ~1x, private copies to Nx.")
    print(f"(python benchmarks/object_store_memory.py --mb {a.mb} --trials {' '.join(map(str, a.trials))})")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
