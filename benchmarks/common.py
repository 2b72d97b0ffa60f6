"""Benchmark harness: every script measures probe and its baseline in the same run and writes one JSON file.

    python benchmarks/bench_extract.py            # -> benchmarks/results/extract.json

Figures are ratios against the baseline measured in that run, plus the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2)}  # other work on the machine skews absolute figures
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """with timer() as t: ...; t["s"] is the elapsed wall time."""
    t: dict[str, float] = {}
    start = time.perf_counter()
    yield t
    t["s"] = time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process (children excluded), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_v(stderr: str) -> tuple[float | None, float | None]:
    """(wall seconds, peak RSS MiB) from the report ``/usr/bin/time -v`` wrote to a child's stderr; None for a
    figure it did not write (a child killed by a timeout)."""
    import re

    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return (sum(float(x) * 60**i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else None,
            int(rss.group(1)) / 1024 if rss else None)


def write_result(name: str, result: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Write ``{"benchmark": name, "machine": …, **result}`` as JSON and print it."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return path
