"""Load test of `probe serve` on loopback: concurrent clients POST a real photo to /embed for a fixed time, against
the same server with micro-batching off (--max-batch 1), one client sending one request at a time, and the offline
extraction throughput of the same backbone (`probe extract` on a folder of photos), in one run.

    python benchmarks/bench_serve.py [--backbone efficientnet_lite0] [--clients 16] [--seconds 20]

Reports requests/s, p50/p99 latency and errors (target 0) per run, the server's mean batch size, and the ratios
batched/unbatched and batched/offline. Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timer, write_result  # noqa: E402

from probe.extract import ExtractConfig, extract  # noqa: E402
from probe.serve.process import running_server  # noqa: E402


def photo_jpeg() -> bytes:
    """A real 500x375 photo (skimage's cat), JPEG-encoded as a client would upload it."""
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((500, 375)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def load(url: str, payload: bytes, clients: int, seconds: float) -> dict:
    """``clients`` concurrent request loops for ``seconds``: each sends its next request when the last returns."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                r = await c.post("/embed", files={"file": ("cat.jpg", payload, "image/jpeg")})
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    continue
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        for _ in range(3):  # warm-up: first forward passes allocate
            await c.post("/embed", files={"file": ("cat.jpg", payload, "image/jpeg")})
        before = (await c.get("/metrics")).json()
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        elapsed = time.perf_counter() - t0
        after = (await c.get("/metrics")).json()
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "errors": sum(errors.values()), "error_kinds": errors,
        "mean_batch": round((after["requests"] - before["requests"]) / batches, 2) if batches else None,
    }


def serve_run(args: list[str], payload: bytes, clients: int, seconds: float) -> dict:
    with running_server([*args, "--log-level", "warning"]) as url:
        return asyncio.run(load(url, payload, clients, seconds))


def offline(backbone: str, payload: bytes, n: int) -> dict:
    """`probe extract` over n copies of the photo (decode + preprocess + forward, its own batching)."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "photos" / "cat"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i:04d}.jpg").write_bytes(payload)
        with timer() as t:
            s = extract(folder.parent, Path(d) / "store.h5", ExtractConfig(backbone=backbone, batch_size=32))
    return {"images": n, "images_per_s": s.images_per_s, "seconds_with_model_load": round(t["s"], 2),
            "dtype": s.dtype}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5)
    ap.add_argument("--offline-images", type=int, default=192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    payload = photo_jpeg()
    with tempfile.TemporaryDirectory() as state:
        base = ["--backbone", a.backbone, "--state-dir", state]
        batched = serve_run([*base, "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)],
                            payload, a.clients, a.seconds)
        unbatched = serve_run([*base, "--max-batch", "1"], payload, a.clients, a.seconds)
        one_at_a_time = serve_run([*base, "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)],
                                  payload, 1, a.seconds / 2)
    reference = offline(a.backbone, payload, a.offline_images)
    write_result("serve", {
        "backbone": a.backbone, "payload": f"{len(payload)} byte JPEG, 500x375 (skimage chelsea)",
        "max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms, "load_average_at_end": os.getloadavg(),
        "batched": batched, "unbatched_max_batch_1": unbatched, "single_client_sequential": one_at_a_time,
        "offline_extract": reference,
        "speedup_batched_vs_unbatched": round(batched["requests_per_s"] / unbatched["requests_per_s"], 2),
        "speedup_batched_vs_one_at_a_time": round(batched["requests_per_s"] / one_at_a_time["requests_per_s"], 2),
        "batched_vs_offline_extract": round(batched["requests_per_s"] / reference["images_per_s"], 2)
        if reference["images_per_s"] else None,
        "errors_total": batched["errors"] + unbatched["errors"] + one_at_a_time["errors"],
    }, a.out)


if __name__ == "__main__":
    main()
