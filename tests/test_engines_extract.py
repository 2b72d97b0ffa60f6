"""Engines inside extraction and queries: ONNX Runtime and torch give interchangeable float32 features (one
configuration), the engine is provenance, and a half-precision store is queried in float32 on a CPU."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from probe.device import query_dtype
from probe.embedder import embedder_for
from probe.extract import extract
from probe.heads.fit import fit_head
from probe.predict import predict
from probe.search import SearchIndex
from probe.store import FeatureStore

from .conftest import DEMO, tiny_config


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    """3 classes x 3 real Fashion-MNIST images (the tiny backbone upsamples them to 160 px)."""
    root = tmp_path_factory.mktemp("real") / "data"
    for cls in ("Bag", "Sneaker", "Trouser"):
        (root / cls).mkdir(parents=True)
        for f in sorted((DEMO / "train" / cls).glob("*.png"))[:3]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_onnxruntime_and_torch_give_one_configuration(real_folder, tmp_path):
    a = extract(real_folder, tmp_path / "ort.h5", tiny_config(engine="onnxruntime"))
    b = extract(real_folder, tmp_path / "torch.h5", tiny_config(engine="torch"))
    assert (a.engine, b.engine) == ("onnxruntime", "torch")
    sa, sb = FeatureStore(a.store), FeatureStore(b.store)
    assert sa.identity == sb.identity and sa.attrs["config_key"] == sb.attrs["config_key"]
    assert sa.attrs["engine"]["engine"] == "onnxruntime" and sa.attrs["engine"]["version"]
    assert sb.attrs["engine"]["engine"] == "torch"
    assert list(sa.paths()) == list(sb.paths())
    assert _cos(sa.features(), sb.features()).min() >= 0.9999
    # same identity: a torch run may grow a store an ONNX Runtime run made (and says so in its provenance)
    extra = real_folder / "Bag" / "extra.png"
    shutil.copy(next((DEMO / "val" / "Bag").glob("*.png")), extra)
    try:
        grown = extract(real_folder, a.store, tiny_config(engine="torch"))
    finally:
        extra.unlink()
    assert grown.embedded == 1 and grown.reused == 9
    assert FeatureStore(a.store).attrs["engine"]["engine"] == "torch"


def test_auto_engine_is_onnxruntime_for_float32_on_cpu(real_folder, tmp_path):
    s = extract(real_folder, tmp_path / "auto.h5", tiny_config())  # float32 on the CPU
    assert s.engine == "onnxruntime"
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        tiny_config(engine="tensorrt")


def test_half_precision_store_is_queried_in_float32_on_cpu(real_folder, tmp_path):
    """A store as a GPU writes it (float16) answers predict and search on a CPU-only machine in float32, with
    ONNX Runtime, and its queries land on their own stored rows."""
    s = extract(real_folder, tmp_path / "gpu-like.h5", replace(tiny_config(engine="torch"), dtype="float16"))
    store = FeatureStore(s.store)
    assert store.identity.dtype == "float16"
    emb = embedder_for(store.identity.to_dict(), device="cpu")
    assert (emb.dtype, emb.engine.name) == ("float32", "onnxruntime")
    files = [store.abspath(p) for p in store.paths()]
    q, ok, _ = emb.embed_files(files)
    assert len(ok) == len(files) and _cos(q, store.features()).min() >= 0.995
    head = tmp_path / "h.safetensors"
    fit_head(store, "prototype", head)
    top = predict(files[:1], head, top_k=1)["predictions"][0]["top"][0]["class"]
    assert top == store.classes[store.labels()[0]]
    idx = SearchIndex.build(store)
    _, ids = idx.search(q, k=1)
    assert (ids[:, 0] == np.arange(len(files))).all()  # each image finds its own stored row first


def test_query_dtype_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert query_dtype("float32", cpu) == "float32" and query_dtype("float16", cpu) == "float32"
    monkeypatch.setattr("probe.device.cpu_has_native_bf16", lambda: False)
    assert query_dtype("bfloat16", cpu) == "float32"
    monkeypatch.setattr("probe.device.cpu_has_native_bf16", lambda: True)
    assert query_dtype("bfloat16", cpu) == "bfloat16"
    # a CPU store on a GPU machine: float32 stays float32, bfloat16 where the GPU has it
    assert query_dtype("float32", cuda) == "float32" and query_dtype("float16", cuda) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert query_dtype("bfloat16", cuda) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert query_dtype("bfloat16", cuda) == "bfloat16"
