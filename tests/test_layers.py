"""Intermediate-layer features: `probe extract --layer`, `probe backbones --layers`, and the layer in the identity."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from probe.backbones import at_layer, create_backbone, describe_layers, list_layers, resolve_layers
from probe.embedder import Embedder, embedder_for
from probe.errors import BackboneError, ProbeError
from probe.extract import ExtractConfig, extract
from probe.identity import IdentityMismatchError, config_key
from probe.store import FeatureStore

from .conftest import DEMO, TINY, make_imagefolder, tiny_config

runner = CliRunner()
X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # resnet18's input size


@pytest.fixture(autouse=True)
def engine_cache(tmp_path_factory, monkeypatch):
    """ONNX exports of this module go to one folder of its own (made once per identity, reused by later tests)."""
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "layers-cache"))


def forward(bb, x: torch.Tensor = X) -> np.ndarray:
    with torch.inference_mode():
        return bb.model(x).numpy()


# ------------------------------------------------------------------------------------------------ names
def test_list_layers_of_timm_torchvision_and_packaged_models():
    assert list_layers("resnet18") == ["layer1", "layer2", "layer3", "layer4"]  # torchvision: top-level stages
    assert list_layers("mobilenet_v3_small") == [f"features.{i}" for i in range(13)]
    assert list_layers("timm/resnet18") == ["act1", "layer1", "layer2", "layer3", "layer4"]  # timm feature_info
    assert list_layers("timm/test_vit") == [f"blocks.{i}" for i in range(6)]
    assert list_layers("efficientnet_lite0") == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    rows = describe_layers("efficientnet_lite0")
    assert [(r["index"], r["channels"]) for r in rows] == [(0, 16), (1, 24), (2, 40), (3, 112), (4, 320)]


def test_resolve_layers_by_name_index_and_shorthand():
    names = ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert resolve_layers("-1", names) == ["layer4"]
    assert resolve_layers("0", names) == ["act1"]
    assert resolve_layers("layer4+-2", names) == ["layer4", "layer3"]  # the order given is kept
    assert resolve_layers("last2", names) == ["layer3", "layer4"]
    with pytest.raises(BackboneError, match="more than once"):
        resolve_layers("layer4+-1", names)


# ----------------------------------------------------------------------------------------------- shapes
def test_torchvision_layer_features_are_pooled_stage_outputs():
    plain = create_backbone("resnet18", "random")  # seeded: the same weights as the layered ones below
    seen = {}
    for n in ("layer2", "layer3", "layer4"):
        getattr(plain.model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
    forward(plain)
    l2 = create_backbone("resnet18", "random", layer="layer2")
    assert (l2.dim, l2.layer, l2.pooling) == (128, "layer2", "avg")
    np.testing.assert_allclose(forward(l2), seen["layer2"].mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    both = create_backbone("resnet18", "random", layer="layer4+layer3")  # concatenated in the order given
    assert both.dim == 512 + 256 and both.extra["layer_dims"] == {"layer4": 512, "layer3": 256}
    want = torch.cat([seen["layer4"].mean((2, 3)), seen["layer3"].mean((2, 3))], 1).numpy()
    np.testing.assert_allclose(forward(both), want, rtol=1e-5, atol=1e-6)
    assert plain.layer is None and plain.pooling == "penultimate" and plain.dim == 512


def test_timm_vit_layer_features_average_the_patch_tokens():
    vit = create_backbone(TINY, "random")
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokens = vit.model.patch_embed(x)
        tokens = vit.model.norm_pre(vit.model._pos_embed(tokens))
        for blk in vit.model.blocks[:5]:
            tokens = blk(tokens)  # (B, 1 + N, C): the class token first
    deep = create_backbone(TINY, "random", layer="-2")  # blocks.4
    assert deep.layer == "blocks.4" and deep.dim == 64
    np.testing.assert_allclose(forward(deep, x), tokens[:, 1:].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    last2 = create_backbone(TINY, "random", layer="last2")
    assert last2.dim == 128 and np.allclose(forward(last2, x)[:, :64], forward(deep, x), atol=1e-6)


# --------------------------------------------------------------------------------------------- identity
def test_layers_get_keys_of_their_own_and_the_default_keeps_the_old_key():
    keys = {}
    for layer in (None, "layer3", "layer4", "-1", "layer3+layer4", "layer4+layer3"):
        emb = Embedder(create_backbone("resnet18", "random", layer=layer), device="cpu", dtype="float32",
                       engine="torch")
        keys[layer] = emb.identity.key
        assert config_key(emb.config) == keys[layer]  # what a store records gives the same key back
    assert keys["-1"] == keys["layer4"]  # an index is recorded as the name it means
    assert len({keys[k] for k in (None, "layer3", "layer4", "layer3+layer4", "layer4+layer3")}) == 5
    emb = Embedder(create_backbone("resnet18", "random"), device="cpu", dtype="float32", engine="torch")
    assert "layer" not in emb.config and emb.config["pooling"] == "penultimate"
    old = {k: emb.config[k] for k in ("backbone", "weights", "weights_sha256", "preprocess", "pooling", "tta",
                                      "dtype")}  # the fields a store made before layers existed hashed
    assert keys[None] == hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_extract_records_the_layer_and_refuses_another_one(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=2)
    out = tmp_path / "s.h5"
    s = extract(data, out, tiny_config(layer="blocks.2"))
    assert (s.dim, s.layer, s.count) == (64, "blocks.2", 6)
    store = FeatureStore(out)
    assert store.attrs["layer"] == "blocks.2" and store.attrs["pooling"] == "avg" and store.dim == 64
    again = extract(data, out, tiny_config(layer="2"))  # the same layer by index: the same configuration
    assert again.embedded == 0 and again.reused == 6
    with pytest.raises(IdentityMismatchError, match="layer: store has 'blocks.2', this run 'blocks.3'"):
        extract(data, out, tiny_config(layer="blocks.3"))
    with pytest.raises(IdentityMismatchError, match="layer: store has 'blocks.2', this run None"):
        extract(data, out, tiny_config())  # the pre-logits embedding is another configuration too
    assert FeatureStore(out).attrs["config_key"] == store.attrs["config_key"]  # untouched


@pytest.mark.slow
def test_query_embedding_of_a_layer_store_reproduces_its_features(tmp_path):
    """Real efficientnet_lite0 weights on real photos: predict/search/serve rebuild the layers from the store."""
    data = tmp_path / "data"
    for c in ("Bag", "Sneaker"):
        (data / c).mkdir(parents=True)
        for f in sorted((DEMO / "train" / c).iterdir())[:3]:
            shutil.copy(f, data / c / f.name)
    out = tmp_path / "lite0.h5"
    s = extract(data, out, ExtractConfig(layer="blocks.4+-1", batch_size=8, workers=0, dtype="float32"))
    assert (s.dim, s.layer, s.engine) == (112 + 320, "blocks.4+blocks.6", "onnxruntime")  # the export works
    store = FeatureStore(out)
    emb = embedder_for(dict(store.attrs), device="cpu")
    assert emb.dim == 432 and emb.backbone.layer == "blocks.4+blocks.6"
    assert emb.identity.key == store.attrs["config_key"]
    paths = store.paths()
    got, ok, bad = emb.embed_files([store.abspath(p) for p in paths])
    assert ok == list(range(len(paths))) and not bad
    X = store.features()
    cos = (got * X).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(X, axis=1)
    assert cos.min() > 0.9999, cos
    torch_emb = embedder_for(dict(store.attrs), device="cpu", engine="torch")  # the torch engine agrees
    np.testing.assert_allclose(torch_emb.embed_files([store.abspath(paths[0])])[0][0], X[0], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(ProbeError) as e:
        create_backbone("resnet18", "random", layer="layer9")
    msg = str(e.value)
    assert "unknown layer 'layer9' of resnet18" in msg and "0:layer1, 1:layer2, 2:layer3, 3:layer4" in msg
    assert "probe backbones --layers resnet18" in msg and "close matches: layer4" in msg
    with pytest.raises(BackboneError, match="an index from -4 to 3"):
        create_backbone("resnet18", "random", layer="4")
    many = [f"blocks.{i}" for i in range(24)]
    with pytest.raises(BackboneError, match=r"19:blocks.19, … 24 in all"):
        resolve_layers("blocks.30", many, "timm/vit_large")
    with pytest.raises(ProbeError, match="joined by"):
        ExtractConfig(layer="layer3++layer4")  # refused before any model loads
    with pytest.raises(BackboneError, match="already gives layer"):
        at_layer(create_backbone("resnet18", "random", layer="layer1"), "layer2")


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_backbones_layers_lists_index_name_and_channels():
    r = runner.invoke(app, ["backbones", "--layers", "resnet18", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"index": i, "name": f"layer{i + 1}", "channels": c}
                                    for i, c in enumerate((64, 128, 256, 512))]
    r = runner.invoke(app, ["backbones", "--layers", "resnet18"])
    assert r.exit_code == 0 and "layer3" in r.stdout and "512" in r.stdout and "--layer" in r.stdout
    r = runner.invoke(app, ["backbones", "--layers", "resnet5O"])
    assert r.exit_code == 1 and "close matches" in r.stderr


def test_cli_extract_layer(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=1)
    out = tmp_path / "s.h5"
    base = ["extract", str(data), "--backbone", TINY, "--weights", "random", "--out", str(out), "--workers", "0",
            "--engine", "torch"]
    r = runner.invoke(app, [*base, "--layer", "-1+blocks.0", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["dim"], got["layer"], got["count"]) == (128, "blocks.5+blocks.0", 3)
    r = runner.invoke(app, ["info", str(out)])
    assert "pooling avg of blocks.5+blocks.0" in r.stdout
    r = runner.invoke(app, [*base, "--layer", "blocks.9"])
    assert r.exit_code == 1 and "unknown layer 'blocks.9'" in r.stderr and "--layers timm/test_vit" in r.stderr
