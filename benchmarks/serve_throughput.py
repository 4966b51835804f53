"""Images/s and latency of the served model (``mlflow models serve``): pictures (the model ``dedn promote`` registers
from an extracted store: a base64 JPEG or PNG per row of ``dataframe_split``) against feature-map JSON (the same
search's model promoted with ``--input features``: ``{"inputs": [...]}``, the stored features of the same pictures),
at 1, 8 and 32 concurrent clients, one picture per request.

Everything is made here, in a temporary folder, with the platform's own commands: drawn pictures resized to photo
size (500 x 375, as CUB's), ``dedn data extract`` with seeded random trunk weights (no download), a one-trial
``dedn search``, two ``dedn promote``. The server runs on 127.0.0.1 with ``--workers`` as ``mlflow models serve``
takes it; the trunk runs on the server's device (CPU here, the GPU where torch sees one).

    python benchmarks/serve_throughput.py --size 448 --requests 48 --workers 1
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import ROOT, free_port

SPEC = """base: base.yaml
store: store
num_samples: 1
params:
  optim.lr: {type: loguniform, low: 1.0e-3, high: 2.0e-3}
scheduler: {type: fifo}
"""


def dedn(*args: str, cwd: Path) -> str:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"dedn {args[0]} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return r.stdout


def build(folder: Path, size: int, per_class: int) -> tuple[str, list[str]]:
    """The pictures, the store, the search and the two promoted models; (tracking URI, the test split's image ids)."""
    from PIL import Image

    from dedn.data import open_store
    from dedn.data.pictures import draw_pictures

    pics = draw_pictures(folder / "pics", per_class)
    for name in pics.files:  # photo-sized, as CUB's pictures
        path = pics.root / name
        with Image.open(path) as img:
            img.load()
            big = img.resize((500, 375), Image.Resampling.BILINEAR)
        big.save(path, quality=90) if path.suffix == ".jpg" else big.save(path)
    dedn("data", "extract", "--images", str(pics.root), "--image-list", str(pics.image_list), "--att-splits",
         str(pics.att_splits), "--weights", str(pics.weights), "--size", str(size), "--out", "store", cwd=folder)  # fmt: skip
    base = (ROOT / "configs" / "pictures.yaml").read_text().replace("epochs: 4", "epochs: 2")
    (folder / "base.yaml").write_text(base.replace("store: data/pics", "store: store") + "device: cpu\n")
    (folder / "spec.yaml").write_text(SPEC)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    dedn("search", "-c", "spec.yaml", "--name", "bench", "--tracking-uri", uri, "--no-final-test", cwd=folder)
    for alias, extra in (("pictures", []), ("features", ["--input", "features"])):
        dedn("promote", "--experiment", "bench", "--model-name", "bench", "--trial", "best", "--alias", alias,
             "--tracking-uri", uri, *extra, cwd=folder)  # fmt: skip
    store = open_store(folder / "store")
    return uri, [store.image_ids[i] for i in store.indices("test")]


def serve(folder: Path, uri: str, alias: str, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/bench@{alias}", "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log = (folder / f"serve-{alias}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"the server stopped: {(folder / f'serve-{alias}.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    sys.exit("the server did not answer /ping")


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def post(port: int, body: bytes) -> float:
    """Seconds for one request, which must be answered 200 with one prediction."""
    t = time.perf_counter()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    assert len(answer["predictions"]) == 1, answer
    return time.perf_counter() - t


def load(port: int, bodies: list[bytes], clients: int, requests: int) -> tuple[float, float, float]:
    """(images/s, p50 ms, p99 ms) of ``requests`` requests from ``clients`` concurrent clients."""
    post(port, bodies[0])  # warm: the first request loads lazily
    order = [bodies[i % len(bodies)] for i in range(max(requests, clients))]
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        took = list(pool.map(lambda b: post(port, b), order))
    wall = time.perf_counter() - t
    ms = np.asarray(took) * 1000
    return len(order) / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=448, help="Extraction size (448: CUB's 2048x14x14 features).")
    ap.add_argument("--per-class", type=int, default=8, help="Pictures per class (six classes).")
    ap.add_argument("--requests", type=int, default=48, help="Requests per concurrency level (at least the clients).")
    ap.add_argument("--workers", type=int, default=1, help="Server workers (mlflow models serve --workers).")
    ap.add_argument("--clients", default="1,8,32", help="Concurrency levels.")
    args = ap.parse_args()
    from dedn.data import open_store

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as d:
        folder = Path(d)
        t = time.perf_counter()
        uri, test_ids = build(folder, args.size, args.per_class)
        print(f"built pictures, store, search and models in {time.perf_counter() - t:.0f} s", flush=True)
        store = open_store(folder / "store")
        rows = {name: i for i, name in enumerate(store.image_ids)}
        feats = store.features()
        pictures = [(folder / "pics" / "images" / name).read_bytes() for name in test_ids]
        bodies = {
            "pictures": [
                json.dumps(
                    {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p).decode()]]}}
                ).encode()
                for p in pictures
            ],
            "features": [
                json.dumps({"inputs": feats[rows[name]][None].astype(np.float32).tolist()}).encode()
                for name in test_ids
            ],
        }
        mb = {k: np.mean([len(b) for b in v]) / 1e6 for k, v in bodies.items()}
        results = []
        for alias in ("pictures", "features"):
            proc, port = serve(folder, uri, alias, args.workers)
            try:
                for c in (int(x) for x in args.clients.split(",")):
                    results.append((alias, c, *load(port, bodies[alias], c, args.requests)))
                    print(f"  {alias} {c} clients: {results[-1][2]:.2f} images/s", flush=True)
            finally:
                stop(proc)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    c, h, w = store.meta.feature_shape
    print(f"\nserved model, {args.workers} worker(s), {device}; features {c}x{h}x{w} ({args.size} px); one picture per "
          f"request; body: pictures {mb['pictures']:.3f} MB, feature-map JSON {mb['features']:.2f} MB")  # fmt: skip
    print(f"{'input':<10} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for alias, clients, rate, p50, p99 in results:
        print(f"{alias:<10} {clients:>7} {rate:>9.2f} {p50:>8.0f} {p99:>8.0f}")
    print(f"\nreproduce: python benchmarks/serve_throughput.py --size {args.size} --requests {args.requests} "
          f"--workers {args.workers} --per-class {args.per_class}")  # fmt: skip


if __name__ == "__main__":
    main()
