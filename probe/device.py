"""Where a backbone runs and in which precision: ``resolve_device`` and ``resolve_dtype``.

Example:
    >>> device = resolve_device("auto")  # cuda when present, else cpu
    >>> resolve_dtype("auto", device)  # float16 on CUDA, bfloat16 on CPUs with native bf16, else float32
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
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX), where it is ~4x faster than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch builds lack the op
        return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> float16 on CUDA, bfloat16 on CPUs with native bf16, else float32; any other of DTYPES as given."""
    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"
