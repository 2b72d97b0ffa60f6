"""Inference engines for the backbone forward: (B, 3, H, W) float32 normalised pixels -> (B, D) float32 features.

* ``TorchEngine``: the backbone in torch on its device, channels-last, autocast to the dtype (float16 on CUDA by
  default, bfloat16 when asked for, or exact float32).
* ``OnnxEngine``: the backbone exported once to ONNX (dynamic batch) and run by ONNX Runtime's CPU provider, float32.
  The export is cached as ``<PROBE_CACHE_DIR or cache>/engines/<identity key[:16]>-<H>x<W>.onnx`` (written
  atomically, checked against torch when made, reopened by later runs; a corrupt file is exported again).

ONNX Runtime float32 gives the same features as torch float32 (cosine >= 0.9999 per image, tested on real photos),
so the two are interchangeable under one feature identity; bfloat16 is another dtype, another identity.

``create_engine("auto", …)`` picks ONNX Runtime for float32 on the CPU -- 2.3x (efficientnet_lite0) and 1.6x
(ResNet-50) torch float32 channels-last on an AVX-512-BF16 EPYC, 4.3x and 2.4x when its cores are contended
(benchmarks/results/engines.json) -- and torch for everything else; a backbone that does not export falls back to
torch with one log line.

Example:
    >>> bb = create_backbone("efficientnet_lite0")
    >>> eng = create_engine("auto", bb.model, identity.key, (224, 224), device="cpu", dtype="float32")
    >>> eng(torch.randn(8, 3, 224, 224)).shape, engine_info(eng)
    ((8, 1280), {'engine': 'onnxruntime', 'version': '1.32.0'})
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ProbeError
from .fs import make_dirs, write_error

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_OPSET = 17  # LayerNormalization is native from 17: ViTs export without decomposition
INPUT, OUTPUT = "pixels", "features"
CHECK_BATCH = 3  # the export traces batch 2; the check runs 3, so a batch size baked into the graph is caught
CHECK_COSINE = 0.999  # minimum per-image cosine of the exported graph to torch float32 (measured ~0.99999+)


class EngineUnavailable(ProbeError):
    """This engine cannot run this backbone here (onnxruntime not installed, the model does not export, another
    device or dtype than the engine supports): the message says why; callers fall back to torch."""


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def engine_dir() -> Path:
    """Where exported engines live: ``<PROBE_CACHE_DIR or cache>/engines`` (as probe.extract.cache_dir)."""
    return Path(os.environ.get("PROBE_CACHE_DIR", "cache")) / "engines"


def engine_path(identity_key: str, input_hw: tuple[int, int]) -> Path:
    h, w = (int(v) for v in input_hw)
    return engine_dir() / f"{identity_key[:16]}-{h}x{w}.onnx"


def input_hw(preprocess: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of what a backbone's preprocessing makes, from ``Backbone.preprocess``: timm's ``input_size``
    (C, H, W), else torchvision's square ``crop``."""
    if preprocess.get("input_size"):
        return int(preprocess["input_size"][-2]), int(preprocess["input_size"][-1])
    crop = preprocess["crop"]
    return (int(crop), int(crop)) if isinstance(crop, int) else (int(crop[0]), int(crop[-1]))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), (np.abs(a - b).max(1) == 0).astype(np.float64))


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float32 on any device or memory format -> a C-contiguous (NCHW) float32 array."""
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()  # a channels-last view is copied to NCHW
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- torch
class TorchEngine:
    """The backbone in torch: ``model.to(device)``, channels-last, autocast to ``dtype`` (probe's forward so far).

    ``model`` is moved (and converted to channels-last) in place, as the Embedder always did."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", dtype: str = "float32",
                 channels_last: bool = True):
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()

    @torch.inference_mode()
    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(np.asarray(x, np.float32)) if not torch.is_tensor(x) else x
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=getattr(torch, self.dtype), enabled=self.dtype != "float32"):
            f = self.model(x)
        return f.float().flatten(1).cpu().numpy()

    @property
    def info(self) -> dict[str, Any]:
        return {**engine_info(self.name), "device": str(self.device), "dtype": self.dtype,
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None}


# ---------------------------------------------------------------------------------------------- onnx
def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise EngineUnavailable(f"onnxruntime is not installed ({e}): pip install onnxruntime") from e
    return onnxruntime


@contextlib.contextmanager
def _export_context():
    """Keep the TorchScript exporter from printing its whole graph to stderr when an operator does not export, and
    nn.MultiheadAttention on its exportable path.

    Its ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` rather than its result, so it turns
    ONNX logging on for the process; the failure message (which EngineUnavailable carries) is enough."""
    c = torch._C
    enabled = c._jit_is_onnx_log_enabled() if hasattr(c, "_jit_is_onnx_log_enabled") else None
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if fastpath:  # nn.MultiheadAttention's fused eval path (torchvision ViTs) has no ONNX export; the plain one has
        mha.set_fastpath_enabled(False)
    log_fn = getattr(c, "_jit_onnx_log", None)
    if log_fn is not None:
        c._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        if log_fn is not None:
            c._jit_onnx_log = log_fn
        if enabled is not None:
            c._jit_set_onnx_log_enabled(enabled)
        if fastpath:
            mha.set_fastpath_enabled(True)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_hw: tuple[int, int],
                opset: int = ONNX_OPSET) -> float:
    """Export ``model`` to ``path`` (batch axis dynamic) atomically: a temporary folder beside it, then a rename.
    Returns the seconds taken. Raises EngineUnavailable when the model does not export to one self-contained file.

    The legacy TorchScript exporter (``dynamo=False``): it needs only the ``onnx`` package, where the dynamo
    exporter also needs ``onnxscript``."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export's TorchScript path imports it to write the model
    except ImportError as e:
        raise EngineUnavailable(f"exporting to ONNX needs the onnx package ({e}): pip install onnx") from e
    path = Path(path)
    try:  # no cache folder (a file named like it, a read-only or full disk): run this model in torch
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=make_dirs(path.parent, path)))
    except OSError as e:
        raise EngineUnavailable(f"the ONNX export cannot be saved: {write_error(path, e)}") from None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.randn(2, 3, *input_hw, device=device)
    start = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _export_context():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
            torch.onnx.export(model, (dummy,), str(tmp / path.name), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        extra = sorted(p.name for p in tmp.iterdir() if p.name != path.name)
        if extra:  # > 2 GB of weights go to external data files: not one file to cache
            raise EngineUnavailable(f"the ONNX export of this model is not one file (external data {extra[:3]})")
        os.replace(tmp / path.name, path)
    except EngineUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - any exporter failure means: run this model in torch
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise EngineUnavailable(f"{type(model).__name__} does not export to ONNX: {type(e).__name__}: {msg}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - start


class OnnxEngine:
    """The backbone in ONNX Runtime (CPUExecutionProvider, float32), exported once per feature identity and input
    size and cached under ``engine_dir()``.

    ``export_seconds`` is the export's time when this engine made the file, None when it reused one. Threads:
    ``threads`` (default: the cores this process may use) intra-op, one inter-op; graph optimisation level all;
    ``spin=False``: idle intra-op threads sleep rather than busy-wait between runs (measured as fast or faster on
    a shared 2-core VM, and it leaves the CPU to DataLoader decode workers between batches).
    """

    name = "onnxruntime"
    dtype = "float32"

    def __init__(self, model: nn.Module, identity_key: str, input_hw: tuple[int, int], threads: int | None = None,
                 path: str | os.PathLike | None = None, check: bool = True, spin: bool = False):
        self._ort = _import_onnxruntime()
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.path = Path(path) if path else engine_path(identity_key, self.input_hw)
        self.threads = int(threads or available_cores())
        self.spin = spin
        self.export_seconds: float | None = None
        self.session = None
        if self.path.is_file():
            try:
                self.session = self._open()
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: make it again
                log.warning("cached ONNX engine %s does not open (%s): exporting it again", self.path,
                            str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
        if self.session is None:
            self.export_seconds = export_onnx(model, self.path, self.input_hw)
            log.info("exported %s to ONNX in %.1f s: %s", type(model).__name__, self.export_seconds, self.path)
            try:
                self.session = self._open()
                if check:
                    self._check(model)
            except Exception as e:
                self.path.unlink(missing_ok=True)  # never leave a file that a later run would trust
                if isinstance(e, EngineUnavailable):
                    raise
                raise EngineUnavailable(f"ONNX Runtime cannot run the exported {type(model).__name__}: "
                                        f"{type(e).__name__}: {str(e).strip()[:300]}") from e

    def _open(self):
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: no per-node optimiser chatter
        if not self.spin:  # idle threads sleep instead of spinning: CPU left to the decode workers (and no slower)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = list(inputs[0].shape) if inputs else []
        if len(inputs) != 1 or len(outputs) != 1 or len(shape) != 4 or shape[1:] != [3, *self.input_hw] \
                or not isinstance(shape[0], str):
            raise ValueError(f"not a (batch, 3, {self.input_hw[0]}, {self.input_hw[1]}) -> features graph: "
                             f"inputs {[(i.name, i.shape) for i in inputs]}, outputs {[o.name for o in outputs]}")
        self._input, self._output = inputs[0].name, outputs[0].name
        return session

    def _check(self, model: nn.Module) -> None:
        """The fresh export against the torch model in float32, on a batch size it was not traced with."""
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.randn(CHECK_BATCH, 3, *self.input_hw, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model(x.to(device)).float().flatten(1).cpu().numpy()
        got = self(x)
        if got.shape != ref.shape:
            raise EngineUnavailable(f"the exported {type(model).__name__} gives shape {got.shape}, torch {ref.shape}")
        cos = float(_cosines(got, ref).min())
        if not cos >= CHECK_COSINE:
            raise EngineUnavailable(f"the exported {type(model).__name__} disagrees with torch float32 "
                                    f"(cosine {cos:.4f} < {CHECK_COSINE})")

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        out = self.session.run([self._output], {self._input: _to_numpy(x)})[0]
        return np.asarray(out, np.float32).reshape(len(out), -1)

    @property
    def info(self) -> dict[str, Any]:
        return {**engine_info(self.name), "dtype": self.dtype, "threads": self.threads, "spin": self.spin,
                "file": str(self.path), "opset": ONNX_OPSET, "export_seconds": self.export_seconds}


# --------------------------------------------------------------------------------------------- choice
def auto_engine(device: str | torch.device, dtype: str) -> str:
    """What ``auto`` runs: ONNX Runtime for float32 on the CPU, torch otherwise.

    Measured (benchmarks/results/engines.json, pure forward): ORT float32 over torch float32 channels-last is
    2.3x/1.6x (efficientnet_lite0/ResNet-50) on an AVX-512-BF16 EPYC (4.3x/2.4x with contended cores) and 2.7x/1.9x
    on an AVX2 EPYC (issue 12), with the same features (cosine 1.0). bfloat16 and float16 stay in torch: ONNX
    Runtime's CPU provider has no bf16 kernels, and a float16 graph ran at 0.5-0.6x its float32. GPUs stay in torch.
    """
    device = torch.device(device)
    return "onnxruntime" if device.type == "cpu" and dtype == "float32" else "torch"


def create_engine(name: str, model: nn.Module, identity_key: str, input_hw: tuple[int, int],
                  device: str | torch.device = "cpu", dtype: str = "float32", channels_last: bool = True,
                  threads: int | None = None) -> TorchEngine | OnnxEngine:
    """The engine ``name`` ("auto", "torch", "onnxruntime") for ``model`` on ``device`` in ``dtype``.

    ``identity_key``: the key of the feature identity the engine produces (``FeatureIdentity.key``): it names the
    cached export, so another backbone, weights, preprocessing or dtype never reuses it. ``input_hw``: the (H, W)
    the preprocessing makes. "onnxruntime" raises EngineUnavailable when it cannot run (asked for explicitly, the
    caller reports it); "auto" falls back to torch with one warning.
    """
    if name not in ENGINES:
        raise ProbeError(f"unknown engine {name!r}: expected one of {', '.join(ENGINES)}")
    device = torch.device(device)
    choice = auto_engine(device, dtype) if name == "auto" else name
    if choice == "onnxruntime":
        try:
            if device.type != "cpu":
                raise EngineUnavailable(f"the onnxruntime engine runs on the CPU, not {device}")
            if dtype != "float32":
                raise EngineUnavailable(f"the onnxruntime engine runs float32, not {dtype} (use --dtype float32)")
            return OnnxEngine(model, identity_key, input_hw, threads=threads)
        except EngineUnavailable as e:
            if name != "auto":
                raise
            log.warning("ONNX Runtime engine unavailable, running the backbone in torch: %s", e)
    return TorchEngine(model, device, dtype, channels_last)


def engine_info(engine: str | TorchEngine | OnnxEngine = "torch") -> dict[str, str]:
    """Name and version of an engine (or engine name), for provenance: ``{"engine": "onnxruntime",
    "version": "1.32.0"}``."""
    name = engine if isinstance(engine, str) else engine.name
    if name == "torch":
        return {"engine": "torch", "version": torch.__version__}
    if name == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            return {"engine": "onnxruntime", "version": "not installed"}
        return {"engine": "onnxruntime", "version": onnxruntime.__version__}
    raise ProbeError(f"unknown engine {name!r}: expected one of {', '.join(ENGINES[1:])}")
