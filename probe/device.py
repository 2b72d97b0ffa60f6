"""Where a backbone runs and in which precision: ``resolve_device`` and ``resolve_dtype``.

Example:
    >>> device = resolve_device("auto")  # cuda when present, else cpu
    >>> resolve_dtype("auto", device)  # float16 on CUDA, float32 on the CPU
"""

from __future__ import annotations

import torch

from .errors import ProbeError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda[:i]' or 'mps' as given, if this machine has it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProbeError(f"device {device!r}: no CUDA device is available on this machine (use 'cpu' or 'auto')")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ProbeError(f"unknown device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX), where it is about 2x faster than float32
    in torch (benchmarks/results/engines.json)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch builds lack the op
        return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> float16 on CUDA, float32 on the CPU; any other of DTYPES as given.

    float32 on every CPU, run by ONNX Runtime (``probe.engine``): on an AVX-512-BF16 EPYC its float32 forward of
    efficientnet_lite0 is 1.6x torch's bfloat16 (104.7 vs 67.4 img/s, benchmarks/results/extract.json), and float32
    gives the same features (so the same store key) on every kind of CPU, where bfloat16 was chosen on some CPUs
    and not on others. ``bfloat16`` stays available: torch on such a CPU runs ResNet-50 faster in it."""
    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "float16" if device.type == "cuda" else "float32"


HALF_PRECISION = ("float16", "bfloat16")


def query_dtype(recorded: str, device: torch.device) -> str:
    """The dtype to embed query images in, for features recorded in ``recorded``, on ``device``.

    The recorded dtype where the device computes it natively; else float32. So a store extracted on a GPU
    (float16) answers queries on a CPU-only machine at float32 CPU speed (ONNX Runtime) instead of emulating
    float16 there, and a bfloat16 store from a CPU with native bf16 is queried in float32 on one without. Half
    and single precision embeddings of one image have cosine >= 0.995 (tests/test_backbones.py on real photos,
    tests/test_engines_extract.py for a float16 store), far above the distance between different images, so
    queries and stored rows stay comparable; the store's own rows are never mixed with rows of another dtype
    (extract refuses that)."""
    if recorded not in HALF_PRECISION:
        return recorded
    if device.type == "cuda":
        return recorded if recorded == "float16" or torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and recorded == "bfloat16" and cpu_has_native_bf16():
        return recorded
    return "float32"
