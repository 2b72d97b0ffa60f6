"""Inference engines for the backbone forward, on pre-made float32 tensors (no decoding): torch eager float32,
torch channels-last float32, torch channels-last bfloat16 autocast, torch.compile (when it compiles within a
minute), ONNX Runtime float32 (probe.engine.OnnxEngine) -- images/s and each one's cosine to torch float32 -- plus
the machine's float32 matmul peak and the fraction of it ResNet-50 reaches.

    python benchmarks/bench_engines.py [--rounds 3] [--no-compile]     # -> benchmarks/results/engines.json

The inputs are skimage.data's real photos through each backbone's own transform, repeated to the batch.
Variants run interleaved, one batch each per round, so a change in machine load hits all of them alike: compare
the per-round ratios (``vs_torch_fp32_cl``, ``vs_torch_bf16_cl``: medians over rounds) rather than absolute figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from probe.backbones import create_backbone  # noqa: E402
from probe.engine import OnnxEngine, _cosines, available_cores, engine_info, export_onnx  # noqa: E402

MODELS = [("efficientnet_lite0", None, 32), ("resnet50", "random", 16)]
RESNET50_GFLOP = 8.2  # ~4.1 GMAC per 224x224 image
COMPILE_LIMIT_S = 60
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    first: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            first.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    model, flags = first.get("model name", ""), set(first.get("flags", "").split())
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        native_bf16 = False
    return {"model": model, "family": first.get("cpu family"), "model_number": first.get("model"),
            "cores_available": available_cores(), "flags": {f: f in flags for f in CPU_FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_native_bf16": native_bf16,
            "torch_threads": torch.get_num_threads()}


MATMUL_N = 3072  # 58 GFLOP: ~0.3 s on two quiet Zen 4 cores


def matmul_probes(n: int = MATMUL_N, bf16: bool = True) -> dict:
    """Callables that each run one n x n matmul (2 n^3 FLOP): float32 in torch (MKL/oneDNN) and numpy (OpenBLAS),
    and with ``bf16`` bfloat16 in torch. Timed inside the interleaved rounds: the peak is measured under the load the
    models saw."""
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    na, nb = ta.numpy(), tb.numpy()
    probes = {"torch_float32": lambda: ta @ tb, "numpy_float32": lambda: na @ nb}
    if bf16:
        ha, hb = ta.bfloat16(), tb.bfloat16()
        probes["torch_bfloat16"] = lambda: ha @ hb
    for f in probes.values():
        f()
    return probes


def gflops(seconds: float, n: int = MATMUL_N) -> float:
    return 2 * n**3 / seconds / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def photos(bb, batch: int) -> tuple[torch.Tensor, int]:
    """(batch, 3, H, W) float32: skimage's real photos through the backbone's transform, cycled; and how many
    distinct images there are (cosines are taken over those)."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
             "colorwheel", "retina"]
    imgs = []
    for n in names:
        f = getattr(skimage.data, n, None)
        try:
            arr = f()
        except Exception:  # noqa: BLE001 - some need pooch downloads
            continue
        if arr.ndim == 3 and arr.shape[2] >= 3:
            imgs.append(bb.transform(Image.fromarray(arr[..., :3])))
    distinct = len(imgs)
    return torch.stack([imgs[i % distinct] for i in range(batch)]), distinct


COMPILE_CHILD = """
import json, os, sys, threading, time, numpy as np, torch
from probe.backbones import create_backbone
name, weights, x_path, out_path, limit = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4], float(sys.argv[5])
rounds = int(sys.argv[6])
bb = create_backbone(name, weights)
x = torch.from_numpy(np.load(x_path)).contiguous(memory_format=torch.channels_last)
model = bb.model.to(memory_format=torch.channels_last)
cm = torch.compile(model)
watchdog = threading.Timer(limit, lambda: os._exit(3))  # a compile past the limit ends the process
watchdog.start()
with torch.inference_mode():
    t = time.perf_counter(); f = cm(x); compile_s = time.perf_counter() - t
    watchdog.cancel()
    model(x)
    ts, ref = [], []
    for _ in range(rounds):  # interleaved with the eager channels-last model: the ratio survives machine load
        t = time.perf_counter(); f = cm(x); ts.append(time.perf_counter() - t)
        t = time.perf_counter(); model(x); ref.append(time.perf_counter() - t)
    np.save(out_path, f.float().numpy())
print("RESULT " + json.dumps({"compile_s": round(compile_s, 1), "images_per_s_rounds": [len(x) / s for s in ts],
                              "vs_torch_fp32_cl_rounds": [r / s for r, s in zip(ref, ts)]}))
"""


def torch_compile(name: str, weights: str | None, x: torch.Tensor, rounds: int, tmp: Path) -> dict:
    """torch.compile (inductor, default mode) in a child process, so a compile that runs away can be stopped."""
    np.save(tmp / "x.npy", x.numpy())
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}  # a cold compile, as a first run sees
    try:
        r = subprocess.run([sys.executable, "-c", COMPILE_CHILD, name, weights or "", str(tmp / "x.npy"),
                            str(tmp / "f.npy"), str(COMPILE_LIMIT_S), str(rounds)],
                           capture_output=True, text=True, timeout=COMPILE_LIMIT_S + 300, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {COMPILE_LIMIT_S + 300} s"}
    if r.returncode == 3:
        return {"error": f"did not compile within {COMPILE_LIMIT_S} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    res = json.loads(lines[-1][7:])
    ips = res.pop("images_per_s_rounds")
    return {"compile_s": res["compile_s"], "images_per_s": round(statistics.median(ips), 2),
            "images_per_s_rounds": [round(v, 2) for v in ips],
            "vs_torch_fp32_cl": round(statistics.median(res["vs_torch_fp32_cl_rounds"]), 2),
            "note": "in a child process, interleaved with its own eager channels-last model (vs_torch_fp32_cl); "
                    "cold inductor cache"}


def ort_session(path: Path, x: np.ndarray, spin: bool = False):
    """A plain ONNX Runtime session on ``path`` with OnnxEngine's options (``spin``: ONNX Runtime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = available_cores()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda: s.run(None, {s.get_inputs()[0].name: x})[0]


def ort_fp16(onnx_path: Path, x: np.ndarray):
    """ONNX Runtime on a float16 conversion of the graph (CPU provider), or the reason it does not run."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    path = onnx_path.with_name("fp16.onnx")
    onnx.save(m, str(path))
    return ort_session(path, x)


def bench_model(name: str, weights: str | None, batch: int, rounds: int, compile_: bool, tmp: Path,
                bf16: bool = True) -> dict:
    """One backbone's variants; ``bf16``: also torch's bfloat16, which only a CPU with native bf16 runs at speed
    (emulated, it took minutes per ResNet-50 round on an AVX2-only EPYC, and probe never chooses it there)."""
    bb = create_backbone(name, weights)
    x, distinct = photos(bb, batch)
    hw = tuple(x.shape[-2:])
    print(f"{name}: batch {batch}, {distinct} distinct photos, {hw[0]}x{hw[1]}", flush=True)
    res: dict = {"backbone": name, "weights": weights or "default", "batch": batch, "input_hw": list(hw)}

    if compile_:  # first, alone: inductor's compile workers would skew the interleaved rounds
        res["torch_compile_fp32_cl"] = torch_compile(name, weights, x, rounds, tmp)
        print("  torch.compile", res["torch_compile_fp32_cl"], flush=True)

    eager = copy.deepcopy(bb.model).eval()
    cl = bb.model.to(memory_format=torch.channels_last).eval()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_np = x.numpy()
    onnx_path = tmp / f"{name}.onnx"
    export_s = export_onnx(eager, onnx_path, hw)
    ort_eng = OnnxEngine(eager, "bench", hw, path=onnx_path, check=False)
    res["onnx_export_s"] = round(export_s, 1)

    def torch_run(m, xx, dtype=None):
        def f():
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=bool(dtype)):
                return m(xx).float().numpy()
        return f

    variants = {
        "torch_fp32_eager": torch_run(eager, x),
        "torch_fp32_cl": torch_run(cl, x_cl),
        **({"torch_bf16_cl": torch_run(cl, x_cl, torch.bfloat16)} if bf16 else {}),
        "onnxruntime_fp32": lambda: ort_eng(x_np),  # probe.engine.OnnxEngine: threads sleep when idle
        "onnxruntime_fp32_spin": ort_session(onnx_path, x_np, spin=True),  # ONNX Runtime's default
    }
    try:
        variants["onnxruntime_fp16"] = ort_fp16(onnx_path, x_np)
        variants["onnxruntime_fp16"]()
    except Exception as e:  # noqa: BLE001 - recorded: the CPU provider may lack float16 kernels
        variants.pop("onnxruntime_fp16", None)
        res["onnxruntime_fp16"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}

    feats = {k: f() for k, f in variants.items()}  # warm-up (oneDNN builds its kernels) and the features
    probes = matmul_probes(bf16=bf16)
    if not bf16:
        res["torch_bf16_cl"] = {"skipped": "no native bf16 on this CPU (emulated bfloat16 is not a probe option)"}
    times: dict[str, list[float]] = {k: [] for k in variants}
    mm: dict[str, list[float]] = {k: [] for k in probes}
    res["load_average_1m_start"] = round(os.getloadavg()[0], 2)
    for r in range(rounds):
        for k, f in variants.items():
            times[k].append(_timed(f))
        for k, f in probes.items():
            mm[k].append(gflops(min(_timed(f), _timed(f))))  # best of two: a descheduled slice is not the peak
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {batch / v[-1]:.1f}" for k, v in times.items())
              + " | matmul GFLOP/s " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in mm.items()), flush=True)
    res["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    res["matmul_gflops"] = {k: round(statistics.median(v), 1) for k, v in mm.items()}
    res["matmul_gflops_rounds"] = {k: [round(x, 1) for x in v] for k, v in mm.items()}
    res["matmul_gflops"]["size"] = MATMUL_N
    res["matmul_gflops_best"] = {k: round(max(v), 1) for k, v in mm.items()}

    ref = feats["torch_fp32_eager"][:distinct]
    for k in variants:
        ips = [batch / s for s in times[k]]
        cos = _cosines(feats[k][:distinct], ref)
        res[k] = {"images_per_s": round(statistics.median(ips), 2), "images_per_s_rounds": [round(v, 2) for v in ips],
                  "vs_torch_fp32_cl": round(statistics.median(a / b for a, b in zip(times["torch_fp32_cl"],
                                                                                     times[k])), 2),
                  **({"vs_torch_bf16_cl": round(statistics.median(a / b for a, b in zip(times["torch_bf16_cl"],
                                                                                         times[k])), 2)}
                     if bf16 else {}),
                  "cosine_vs_torch_fp32_min": round(float(cos.min()), 6),
                  "cosine_vs_torch_fp32_mean": round(float(cos.mean()), 6)}
    c = res.get("torch_compile_fp32_cl", {})
    if "images_per_s" in c:
        c["cosine_vs_torch_fp32_min"] = round(float(_cosines(np.load(tmp / "f.npy")[:distinct], ref).min()), 6)
    if name == "resnet50":  # per round: the model's GFLOP/s over the best float32 (bf16) matmul of the same round
        fp32_peak = [max(a, b) for a, b in zip(mm["torch_float32"], mm["numpy_float32"])]
        frac = {}
        for k in (k for k in variants if "fp16" not in k):
            basis = mm["torch_bfloat16"] if "bf16" in k else fp32_peak
            frac[k] = round(statistics.median(batch / s * RESNET50_GFLOP / p for s, p in zip(times[k], basis)), 3)
        frac["basis"] = (f"{RESNET50_GFLOP} GFLOP/image over the best {MATMUL_N}^2 float32 matmul (torch or numpy"
                         + ("; bfloat16 matmul for torch_bf16_cl" if bf16 else "")
                         + ") timed in the same round; median over rounds")
        res["fraction_of_matmul_peak"] = frac
        best32, best16 = max(fp32_peak), max(mm.get("torch_bfloat16", [0.0]))
        res["fraction_of_best_matmul_in_run"] = {
            k: round(v["images_per_s"] * RESNET50_GFLOP / (best16 if "bf16" in k else best32), 3)
            for k, v in res.items() if k in variants and "fp16" not in k}
        res["fraction_of_best_matmul_in_run"]["basis"] = (f"median images/s x {RESNET50_GFLOP} GFLOP over the "
                                                          f"fastest matmul of the run ({best32:.0f} float32"
                                                          + (f", {best16:.0f} bfloat16" if bf16 else "") + " GFLOP/s)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--models", default=",".join(m for m, _, _ in MODELS))
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(available_cores())
    cpu = cpu_info()
    print(json.dumps(cpu), flush=True)
    wanted = args.models.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights, batch in MODELS:
            if name in wanted:
                results.append(bench_model(name, weights, batch, args.rounds, not args.no_compile, Path(tmp),
                                           bf16=cpu["torch_native_bf16"]))
    write_result("engines", {
        "cpu": cpu, "engines": {**engine_info("onnxruntime"), "torch": torch.__version__},
        "models": results, "rounds": args.rounds,
        "note": args.note or ("Pure forward on pre-made float32 tensors, one batch per variant per round, "
                              "interleaved with three matmuls (the peak). Taken on a shared 2-core VM while other "
                              "engineers' test runs were active (see load_average_*): absolute images/s swing by "
                              "2-6x between runs, and torch's OpenMP threads lose far more than ONNX Runtime's pool "
                              "when the cores are oversubscribed; the per-round ratios are the figures to use."),
    }, args.out)


if __name__ == "__main__":
    os.environ.setdefault("PROBE_OFFLINE", "1")
    main()
