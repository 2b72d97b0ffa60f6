"""probe.engine: ONNX Runtime float32 gives torch float32's features on real photos; the export is cached, reused,
re-made when corrupt; a model that does not export (or a missing onnxruntime) is EngineUnavailable, and auto falls
back to torch."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from probe import engine as E  # noqa: E402
from probe.engine import (  # noqa: E402
    EngineUnavailable,
    OnnxEngine,
    TorchEngine,
    create_engine,
    engine_info,
    engine_path,
    input_hw,
)
from probe.errors import ProbeError  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Small(nn.Module):
    """A few milliseconds to export: conv, BN, pool -> (B, 8)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


class FFT(nn.Module):
    """aten::fft_rfft2 has no ONNX export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.fft.rfft2(self.conv(x)).abs().mean((2, 3))


class BakedBatch(nn.Module):
    """Traces, but a Python int bakes the traced batch size (2) into the graph: the export check catches it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        f = self.conv(x)
        return f.reshape(int(f.shape[0]), -1)[:, :8]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def lite0():
    from probe.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos(lite0) -> torch.Tensor:
    """Real photos through the backbone's own (timm) transform: (4, 3, 224, 224) float32."""
    import skimage.data
    from PIL import Image

    arrays = (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket())
    return torch.stack([lite0.transform(Image.fromarray(a)) for a in arrays])


@pytest.mark.slow
def test_onnx_matches_torch_fp32_on_photos_and_reuses_its_export(lite0, photos, cache, monkeypatch):
    key = "0123456789abcdef" + "f" * 48
    assert input_hw(lite0.preprocess) == (224, 224) == tuple(photos.shape[-2:])
    eng = create_engine("onnxruntime", lite0.model, key, (224, 224), device="cpu", dtype="float32")
    assert isinstance(eng, OnnxEngine) and eng.export_seconds and eng.export_seconds > 0 and not eng.spin
    assert eng.path == cache / "engines" / "0123456789abcdef-224x224.onnx" == engine_path(key, (224, 224))
    assert eng.path.is_file() and not [p for p in eng.path.parent.iterdir() if p != eng.path]  # no temp left
    torch_eng = TorchEngine(lite0.model, "cpu", "float32")  # channels-last, exact float32: probe's forward
    ref = torch_eng(photos)
    got = eng(photos)  # NCHW tensor in
    assert got.shape == ref.shape == (4, lite0.dim) and got.dtype == np.float32
    assert _cos(got, ref).min() >= 0.9999
    np.testing.assert_allclose(eng(photos.contiguous(memory_format=torch.channels_last).numpy()[:1]), got[:1],
                               rtol=1e-4, atol=1e-4)  # numpy in, batch 1 (the batch axis is dynamic)
    assert engine_info(eng) == {"engine": "onnxruntime", "version": __import__("onnxruntime").__version__}
    assert eng.info["export_seconds"] == eng.export_seconds and eng.info["threads"] >= 1

    # a second create reuses the file: no export at all
    mtime = eng.path.stat().st_mtime_ns
    monkeypatch.setattr(E, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    again = create_engine("auto", lite0.model, key, (224, 224), device="cpu", dtype="float32")
    assert isinstance(again, OnnxEngine) and again.export_seconds is None and again.info["export_seconds"] is None
    assert eng.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again(photos), got)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_cached_export_is_made_again(cache, caplog, damage):
    model = Small().eval()
    first = create_engine("onnxruntime", model, "k" * 64, (32, 32))
    x = torch.randn(5, 3, 32, 32)
    want = first(x)
    data = first.path.read_bytes()
    first.path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not onnx" * 50, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="probe.engine"):
        second = create_engine("onnxruntime", model, "k" * 64, (32, 32))
    assert second.export_seconds is not None  # exported again
    assert "does not open" in caplog.text and str(second.path) in caplog.text
    assert second.path.stat().st_size == len(data)
    np.testing.assert_allclose(second(x), want, rtol=1e-5, atol=1e-6)


def test_a_model_that_does_not_export_is_unavailable_and_auto_falls_back(cache, caplog):
    with pytest.raises(EngineUnavailable, match="fft_rfft2"):
        create_engine("onnxruntime", FFT().eval(), "a" * 64, (16, 16))
    assert not list((cache / "engines").iterdir())  # nothing left half-written
    with caplog.at_level(logging.WARNING, logger="probe.engine"):
        eng = create_engine("auto", FFT().eval(), "a" * 64, (16, 16))
    assert isinstance(eng, TorchEngine) and eng.dtype == "float32"
    assert caplog.text.count("running the backbone in torch") == 1 and "fft_rfft2" in caplog.text
    assert eng(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert isinstance(EngineUnavailable("x"), ProbeError)  # asked for explicitly: the CLI prints one line


def test_an_export_that_bakes_in_the_batch_size_is_caught(cache):
    with pytest.raises(EngineUnavailable, match="cannot run the exported BakedBatch|disagrees|shape"):
        create_engine("onnxruntime", BakedBatch().eval(), "b" * 64, (16, 16))
    assert not list((cache / "engines").iterdir())  # a later run must not trust it


def test_missing_onnxruntime_is_unavailable(cache, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(EngineUnavailable, match="onnxruntime is not installed"):
        create_engine("onnxruntime", Small().eval(), "c" * 64, (32, 32))
    assert isinstance(create_engine("auto", Small().eval(), "c" * 64, (32, 32)), TorchEngine)
    assert engine_info("onnxruntime") == {"engine": "onnxruntime", "version": "not installed"}


def test_auto_choice_and_refusals(cache):
    m = Small().eval()
    assert isinstance(create_engine("auto", m, "d" * 64, (32, 32), "cpu", "float32"), OnnxEngine)
    bf16 = create_engine("auto", m, "e" * 64, (32, 32), "cpu", "bfloat16")
    assert isinstance(bf16, TorchEngine) and bf16.dtype == "bfloat16"  # only torch has bf16 kernels on the CPU
    assert bf16(np.random.rand(2, 3, 32, 32).astype(np.float32)).dtype == np.float32
    with pytest.raises(EngineUnavailable, match="float32, not bfloat16"):
        create_engine("onnxruntime", m, "e" * 64, (32, 32), "cpu", "bfloat16")
    with pytest.raises(EngineUnavailable, match="on the CPU"):
        create_engine("onnxruntime", m, "e" * 64, (32, 32), "cuda", "float32")
    assert isinstance(create_engine("torch", m, "e" * 64, (32, 32)), TorchEngine)
    with pytest.raises(ProbeError, match="unknown engine 'tensorrt'"):
        create_engine("tensorrt", m, "e" * 64, (32, 32))
    assert engine_info("torch") == {"engine": "torch", "version": torch.__version__}
