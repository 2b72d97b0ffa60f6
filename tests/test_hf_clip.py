"""hf/ (transformers) and clip/ (open_clip) backbones and the CLIP text tower, offline: tiny random models saved
locally (transformers' save_pretrained; an open_clip config registered with add_model_config), no hub."""

from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from cli.main import app  # noqa: E402
from probe.backbones import (  # noqa: E402
    BackboneError,
    WeightsUnavailableError,
    at_layer,
    create_backbone,
    describe,
    describe_layers,
    list_layers,
    weights_available,
)
from probe.clip import is_clip, text_tower, text_tower_for  # noqa: E402
from probe.embedder import Embedder, embedder_for  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.hf import processor_transform  # noqa: E402
from probe.identity import FeatureIdentity  # noqa: E402
from probe.store import FeatureStore  # noqa: E402
from probe.transforms import PixelTransform  # noqa: E402

from .conftest import make_imagefolder  # noqa: E402

runner = CliRunner()
TINY_CLIP = "probe-test-clip"  # registered below: a 2-layer ViT image tower, 2-layer text tower, 16-d joint space
TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random transformers models with their image processors, saved as save_pretrained writes them."""
    T = transformers
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)  # not create_backbone's seed 0 for weights="random": "pretrained" must differ from random
    vit = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=32, patch_size=8)
    T.ViTModel(vit, add_pooling_layer=False).save_pretrained(root / "vit")  # as google/vit-* hold it: no pooler
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    cnx = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    T.ConvNextModel(cnx).save_pretrained(root / "convnext")
    T.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(root / "convnext")
    clip = T.CLIPConfig(projection_dim=12,
                        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 32, "vocab_size": 100, "bos_token_id": 0,
                                     "eos_token_id": 1, "pad_token_id": 1},
                        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 32, "image_size": 32, "patch_size": 8})
    T.CLIPModel(clip).save_pretrained(root / "clip")
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    return {k: root / k for k in ("vit", "convnext", "clip")}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("oc") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imgs") / "data")  # 3 classes x 4, 48x40 RGB


def _extract(folder: Path, out: Path, backbone: str, *extra: str) -> dict:
    r = runner.invoke(app, ["extract", str(folder), "--backbone", backbone, "--out", str(out), "--workers", "0",
                            "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def stores(models, tiny_clip, folder, tmp_path_factory) -> dict[str, Path]:
    """A store per family through `probe extract` (the PIL path: the same pixels as the direct forwards below), with
    ONNX Runtime (the CPU float32 default) exporting into a private engine cache."""
    tmp = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROBE_CACHE_DIR", str(tmp / "cache"))
        _extract(folder, tmp / "vit.h5", f"hf/{models['vit']}", "--pixels", "pil")
        _extract(folder, tmp / "clip.h5", f"clip/{tiny_clip}", "--weights", "random", "--pixels", "pil")
    return {"vit": tmp / "vit.h5", "clip": tmp / "clip.h5"}


def _images(store: FeatureStore) -> list[Image.Image]:
    return [Image.open(store.root / str(p)).convert("RGB") for p in store.paths()]


# ---------------------------------------------------------------------------------------------- hf/
def test_hf_extract_equals_a_direct_transformers_forward_and_records_provenance(models, stores):
    fs = FeatureStore(stores["vit"])
    X = fs.features()
    assert X.shape == (12, 32)  # hidden_size
    model = transformers.AutoModel.from_pretrained(models["vit"], add_pooling_layer=False).eval()
    bb = create_backbone(f"hf/{models['vit']}")
    with torch.inference_mode():
        pix = torch.stack([bb.transform(im) for im in _images(fs)])  # (12, 3, 32, 32)
        direct = model(pixel_values=pix).last_hidden_state[:, 0].numpy()  # ViT: the class token
    assert _cos(X, direct).min() > 0.999
    a = fs.attrs
    assert a["backbone"] == f"hf/{models['vit']}" and a["weights"] == f"hf:{models['vit']}"
    assert a["weights_sha256"] == bb.weights_sha256 and len(a["weights_sha256"]) == 64
    assert a["weights_sha256"] != create_backbone(f"hf/{models['vit']}", "random").weights_sha256
    pre = a["preprocess"]
    assert pre["processor"] == "ViTImageProcessor" and pre["output"] == "cls"
    assert pre["transformers"] == transformers.__version__ and pre["input_size"] == [3, 32, 32]
    assert a["engine"]["engine"] == "onnxruntime"  # the exported graph ran, and passed its check against torch


@pytest.mark.parametrize("family", ["vit", "convnext", "clip"])
def test_hf_preprocessing_is_the_saved_processors(models, family):
    bb = create_backbone(f"hf/{models[family]}")
    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    proc = transformers.AutoImageProcessor.from_pretrained(models[family], **pil)  # the Pillow processor
    rng = np.random.default_rng(len(family))
    img = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))  # 61x45: clip's crop offset is 5.5
    ours = bb.transform(img)
    theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4  # the same pixels: size rule, resample, crop offset, mean/std
    with torch.inference_mode():
        f_ours, f_theirs = bb.model(ours[None]).numpy(), bb.model(theirs[None]).numpy()
    assert _cos(f_ours, f_theirs)[0] > 0.99
    assert bb.pixels is not None  # and the uint8 fast path reads it


def test_uint8_pixel_path_crops_where_the_processor_does(models, tmp_path):
    """transformers puts an odd crop margin's extra pixel after the crop (offset floor(11 / 2) = 5), torchvision's
    CenterCrop before it (round(5.5) = 6): the uint8 path crops as the processor it read, not as torchvision."""
    from torchvision.transforms import CenterCrop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 43, 3), dtype=np.uint8))  # 43 wide -> 32: margin 11
    transformers.CLIPImageProcessor(do_resize=False, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path, **pil)(images=img, return_tensors="pt")
    bb = create_backbone(f"hf/{models['clip']}")
    tf, _ = processor_transform(transformers.AutoImageProcessor.from_pretrained(tmp_path))
    pixels = PixelTransform.from_transform(tf)  # crop only: no resize kernel between the two paths
    u8 = pixels(img)  # (32, 32, 3)
    assert torch.equal(u8, torch.from_numpy(np.array(img))[4:36, 5:37])  # rows (40-32)/2 = 4, columns floor(5.5)
    assert (pixels.normalise(u8[None])[0] - theirs["pixel_values"][0]).abs().max() < 1e-5
    assert (pixels.normalise(u8[None])[0] - tf(img)).abs().max() < 1e-5  # = the PIL path
    assert not torch.equal(u8.permute(2, 0, 1), CenterCrop(32)(PixelTransform.chw(img)))  # torchvision's is 6
    # the saved CLIP: shortest edge 45 -> 32 makes 61x45 43x32, then the same crop; Pillow's and torch's resize
    # kernels differ by a grey level or so, a column's shift by far more on noise
    img = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    ref, got = bb.transform(img), bb.pixels.normalise(bb.pixels(img)[None])[0]
    std = torch.tensor(bb.pixels.std).view(3, 1, 1) * 255
    assert ((got - ref).abs() * std).mean() < 2
    assert ((got[..., 1:] - ref[..., :-1]).abs() * std).mean() > 20  # what one column off looks like
    # the uint8 path rounded that offset before: its stores' key differs from these, so rows never mix
    assert Embedder(bb, engine="torch").identity.preprocess["crop_offset"] == "floor"
    assert "crop_offset" not in Embedder(bb, engine="torch", pixels="pil").identity.preprocess
    # a store made before (no crop_offset recorded) is still queried as it was made: its crops rounded
    now = Embedder(bb, engine="torch").config
    before = {**now, "preprocess": {k: v for k, v in now["preprocess"].items() if k != "crop_offset"}}
    again, old = embedder_for(now, device="cpu", engine="torch"), embedder_for(before, device="cpu", engine="torch")
    assert again.identity.key == FeatureIdentity.from_config(now).key
    assert old.identity.key == FeatureIdentity.from_config(before).key != again.identity.key
    assert [kw.get("offset") for k, kw in old.pixels.steps if k == "crop"] == [None]  # torchvision's rounding
    assert not torch.equal(old.pixels(img), again.pixels(img))  # 43 wide -> 32: one column apart
    vit = create_backbone(f"hf/{models['vit']}")  # resize only: nothing to record
    assert "crop_offset" not in Embedder(vit, engine="torch").identity.preprocess


def test_pooling_per_family(models):
    x = torch.randn(2, 3, 32, 32)
    vit, cnx, clip = (create_backbone(f"hf/{models[k]}") for k in ("vit", "convnext", "clip"))
    assert (vit.preprocess["output"], cnx.preprocess["output"], clip.preprocess["output"]) == (
        "cls", "pooler", "image_features")
    T = transformers
    with torch.inference_mode():
        m = T.ConvNextModel.from_pretrained(models["convnext"]).eval()
        assert torch.allclose(cnx.model(x), m(pixel_values=x).pooler_output, atol=1e-5)
        m = T.CLIPModel.from_pretrained(models["clip"]).eval()
        f = m.get_image_features(pixel_values=x)
        f = f if torch.is_tensor(f) else f.pooler_output
        assert clip.dim == 12 and torch.allclose(clip.model(x), f, atol=1e-5)  # projected: the text tower's space
    assert vit.dim == 32 and cnx.dim == 16


def test_changed_processor_changes_the_config_key(models, tmp_path):
    base = create_backbone(f"hf/{models['convnext']}")
    for change in ({"size": {"shortest_edge": 40}}, {"image_mean": [0.4, 0.5, 0.6]}):
        d = tmp_path / str(len(os.listdir(tmp_path)))
        shutil.copytree(models["convnext"], d)
        transformers.ConvNextImageProcessor(**{"size": {"shortest_edge": 32}, "crop_pct": 0.875, **change}
                                            ).save_pretrained(d)
        bb = create_backbone(f"hf/{d}")
        assert bb.weights_sha256 == base.weights_sha256  # same weights ...
        assert Embedder(bb, engine="torch").identity.key != Embedder(base, engine="torch").identity.key  # ... new key
    assert bb.preprocess["mean"] == [0.4, 0.5, 0.6]


def test_extract_into_a_store_of_another_hf_model_is_refused(models, folder, tmp_path):
    out = tmp_path / "s.h5"
    _extract(folder, out, f"hf/{models['vit']}", "--engine", "torch")
    r = runner.invoke(app, ["extract", str(folder), "--backbone", f"hf/{models['vit']}", "--weights", "random",
                            "--out", str(out), "--workers", "0", "--engine", "torch"])
    assert r.exit_code == 1 and "another backbone configuration" in r.output and "weights" in r.output
    r = runner.invoke(app, ["extract", str(folder), "--backbone", f"hf/{models['convnext']}", "--out", str(out),
                            "--workers", "0", "--engine", "torch"])
    assert r.exit_code == 1 and "convnext" in r.output


def test_embedder_for_rebuilds_hf_and_clip_features(stores):
    for key in ("vit", "clip"):
        fs = FeatureStore(stores[key])
        emb = embedder_for(fs.attrs, device="cpu", engine="torch")
        assert emb.identity.key == fs.attrs["config_key"]
        assert _cos(emb.embed_images(_images(fs)), fs.features()).min() > 0.999


def test_missing_hub_model_offline_is_one_clear_line(folder):
    r = runner.invoke(app, ["extract", str(folder), "--backbone", "hf/probe-org/no-such-model", "--workers", "0"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrained weights for hf/probe-org/no-such-model are not "
                                                   "cached")
    assert "huggingface-cli download probe-org/no-such-model" in lines[0] and "hf/FOLDER" in lines[0]
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("hf/./no/such/folder")
    assert not weights_available("hf/probe-org/no-such-model")


def test_folder_without_an_image_processor_is_refused(models, tmp_path):
    d = tmp_path / "noproc"
    shutil.copytree(models["vit"], d)
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(BackboneError, match="no image processor"):
        create_backbone(f"hf/{d}")


# -------------------------------------------------------------------------------------------- clip/
def test_clip_store_and_text_tower_share_one_space(tiny_clip, stores):
    fs = FeatureStore(stores["clip"])
    X, attrs = fs.features(), fs.attrs
    assert X.shape == (12, 16) and is_clip(attrs)
    assert attrs["preprocess"]["open_clip"] == open_clip.__version__
    torch.manual_seed(0)  # the random model create_backbone builds
    model, _, tf = open_clip.create_model_and_transforms(tiny_clip, pretrained=None)
    model.eval()
    with torch.inference_mode():
        direct = model.encode_image(torch.stack([tf(im) for im in _images(fs)])).numpy()
    assert _cos(X, direct).min() > 0.999
    assert not np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-3)  # stored as encode_image gives it: unnormalised
    tower = text_tower_for(attrs, device="cpu")
    assert tower.identity["weights_sha256"] == attrs["weights_sha256"] and tower.identity["model"] == tiny_clip
    texts = ["a photo of a cat", "a photo of a dog", "a fox"]
    T = tower.encode(texts)
    assert T.shape == (3, X.shape[1]) == (3, tower.dim) and T.dtype == np.float32
    assert np.allclose(np.linalg.norm(T, axis=1), 1, atol=1e-5)
    with torch.inference_mode():
        ref = model.encode_text(open_clip.get_tokenizer(tiny_clip)(texts), normalize=True).numpy()
    assert np.allclose(T, ref, atol=1e-5)  # the same projection as the image side


def test_text_tower_encode_batches_and_refuses(tiny_clip, stores):
    tower = text_tower(f"clip/{tiny_clip}", "random", device="cpu")
    texts = [f"text {i}" for i in range(5)]
    assert np.allclose(tower.encode(texts, batch_size=2), tower.encode(texts), atol=1e-6)
    assert tower.encode([]).shape == (0, 16)
    with pytest.raises(ProbeError, match="list of texts"):
        tower.encode("a cat")
    vit = FeatureStore(stores["vit"]).attrs
    with pytest.raises(ProbeError, match=r"backbone hf/.* has no text tower: text needs a clip/"):
        text_tower_for(vit)
    with pytest.raises(BackboneError, match="not the ones these features were made with"):
        text_tower_for({**FeatureStore(stores["clip"]).attrs, "weights_sha256": "0" * 64})


def test_clip_checkpoint_in_the_name_or_as_weights(tiny_clip, tmp_path):
    ref = create_backbone(f"clip/{tiny_clip}", "random")
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip, pretrained=None)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    by_name = create_backbone(f"clip/{tiny_clip}:{ckpt}")
    by_weights = create_backbone(f"clip/{tiny_clip}", str(ckpt))
    assert by_name.name == f"clip/{tiny_clip}:{ckpt.resolve()}"
    assert by_name.weights == f"open_clip:file:{ckpt.resolve()}"
    assert by_weights.weights == f"file:{ckpt.resolve()}"
    assert ref.weights_sha256 == by_name.weights_sha256 == by_weights.weights_sha256
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(ref.model(x), by_name.model(x), atol=1e-6)
    assert describe(f"clip/{tiny_clip}:{ckpt}") == {"name": f"clip/{tiny_clip}:{ckpt}", "family": "clip", "dim": 16,
                                                    "input_size": 32, "offline": True}


def test_clip_names_and_offline_errors(tiny_clip):
    with pytest.raises(BackboneError, match="close matches: clip/ViT-B-32"):
        create_backbone("clip/ViT-B-33:openai")
    with pytest.raises(BackboneError, match="names no pretrained weights: write clip/ViT-B-32:<tag> \\(openai"):
        create_backbone("clip/ViT-B-32")
    with pytest.raises(BackboneError, match="unknown pretrained tag 'opnai' for ViT-B-32: expected openai"):
        create_backbone("clip/ViT-B-32:opnai")
    with pytest.raises(WeightsUnavailableError, match="clip/ViT-B-32:openai are not cached.*huggingface-cli download"):
        create_backbone("clip/ViT-B-32:openai")
    assert not weights_available("clip/ViT-B-32:openai")


# --------------------------------------------------------------------------------------------- layers
def test_hf_layers_are_its_hidden_states_averaged_over_positions(models):
    """hidden_states[i] of the model (a dual encoder's vision tower), averaged over its grid or its patch tokens
    (the class token left out), several concatenated; named and counted without weights (the meta device)."""
    assert list_layers(f"hf/{models['vit']}") == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert [r["channels"] for r in describe_layers(f"hf/{models['convnext']}")] == [8, 8, 16]  # stem, 2 stages
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    T = transformers
    with torch.inference_mode():
        vit = create_backbone(f"hf/{models['vit']}", layer="-1")
        assert (vit.dim, vit.layer, vit.pooling) == (32, "hidden_states.2", "avg")
        hs = T.ViTModel.from_pretrained(models["vit"], add_pooling_layer=False).eval()(
            pixel_values=x, output_hidden_states=True).hidden_states  # (B, 1 + 16, 32): the class token first
        assert torch.allclose(vit.model(x), hs[2][:, 1:].mean(1), atol=1e-5)
        cnx = create_backbone(f"hf/{models['convnext']}", layer="2+hidden_states.1")  # in the order given
        hs = T.ConvNextModel.from_pretrained(models["convnext"]).eval()(pixel_values=x, output_hidden_states=True
                                                                         ).hidden_states  # (B, C, h, w)
        assert cnx.extra["layer_dims"] == {"hidden_states.2": 16, "hidden_states.1": 8}
        assert torch.allclose(cnx.model(x), torch.cat([hs[2].mean((2, 3)), hs[1].mean((2, 3))], 1), atol=1e-5)
        clip = create_backbone(f"hf/{models['clip']}", layer="hidden_states.1")
        hs = T.CLIPModel.from_pretrained(models["clip"]).eval().vision_model(
            pixel_values=x, output_hidden_states=True).hidden_states
        assert clip.dim == 16 and torch.allclose(clip.model(x), hs[1][:, 1:].mean(1), atol=1e-5)
    with pytest.raises(BackboneError, match="unknown layer 'hidden_states.3'.*2:hidden_states.2"):
        create_backbone(f"hf/{models['vit']}", layer="hidden_states.3")


def test_hf_layer_store_keeps_its_layer_and_is_rebuilt_from_it(models, folder, tmp_path):
    out, name = tmp_path / "s.h5", f"hf/{models['vit']}"
    got = _extract(folder, out, name, "--layer", "1")  # ONNX Runtime: the layered graph exports too
    assert (got["dim"], got["layer"], got["count"]) == (32, "hidden_states.1", 12)
    fs = FeatureStore(out)
    assert fs.attrs["layer"] == "hidden_states.1" and fs.attrs["pooling"] == "avg"
    assert fs.attrs["engine"]["engine"] == "onnxruntime"
    keys = {layer: Embedder(create_backbone(name, layer=layer), engine="torch").identity.key
            for layer in (None, "hidden_states.1", "hidden_states.2", "-1")}
    assert keys["-1"] == keys["hidden_states.2"] and len({keys[k] for k in (None, "hidden_states.1", "-1")}) == 3
    r = runner.invoke(app, ["extract", str(folder), "--backbone", name, "--out", str(out), "--workers", "0",
                            "--layer", "-1", "--engine", "torch"])
    assert r.exit_code == 1 and "layer: store has 'hidden_states.1', this run 'hidden_states.2'" in r.output
    emb = embedder_for(fs.attrs, device="cpu", engine="torch")
    assert emb.backbone.layer == "hidden_states.1" and emb.identity.key == fs.attrs["config_key"]
    assert _cos(emb.embed_images(_images(fs)), fs.features()).min() > 0.999


def test_cli_backbones_layers_lists_hf_hidden_states(models):
    r = runner.invoke(app, ["backbones", "--layers", f"hf/{models['convnext']}", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"index": i, "name": f"hidden_states.{i}", "channels": c}
                                    for i, c in enumerate((8, 8, 16))]


def _save(model, folder: Path) -> str:
    """A tiny transformers model and a 32 x 32 processor saved as save_pretrained writes them -> its hf/ name."""
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return f"hf/{folder}"


def _tower(bb) -> torch.nn.Module:
    """The transformers image model under a layered hf/ backbone (a dual encoder's vision tower)."""
    return bb.model.body.tower


def test_hf_layers_start_up_runs_the_model_once(models):
    """Creating an hf/ backbone runs its model once (which output, its width; was twice), and taking its layers
    once more: names and widths from one forward (was two: one to count them, one to measure them)."""
    runs = []
    embeddings = ("ViTEmbeddings", "ConvNextEmbeddings", "CLIPVisionEmbeddings")  # once per image forward

    def count(module, args) -> None:
        if type(module).__name__ in embeddings:
            runs.append(1)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        for kind, layer in (("vit", "1+-1"), ("convnext", "0"), ("clip", "last2")):
            runs.clear()
            bb = create_backbone(f"hf/{models[kind]}")
            assert len(runs) == 1, kind
            layered = at_layer(bb, layer)
            assert len(runs) == 2, kind
            with torch.inference_mode():
                layered.model(torch.zeros(2, 3, 32, 32))
            assert len(runs) == 3, kind  # and one per batch
    finally:
        hook.remove()


def test_hf_layer_features_equal_the_pooled_hidden_states_bit_for_bit(models, tmp_path):
    """Pooled where the model makes them (hooks), the features are exactly output_hidden_states' pooled by hand:
    class and register tokens left out, Swin's stage tokens and ConvNeXt's maps whole."""
    T = transformers
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    names = {k: f"hf/{models[k]}" for k in ("vit", "convnext", "clip")}
    names["dinov2_registers"] = _save(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=16, num_register_tokens=4, **small)), tmp_path / "dinov2")
    names["swin"] = _save(T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                   num_heads=[1, 2], window_size=4)), tmp_path / "swin")
    prefix = {"vit": 1, "clip": 1, "dinov2_registers": 5}  # class (+ register) tokens in front
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for kind, name in names.items():
        bb = create_backbone(name, layer="-1+0")  # in the order given
        with torch.inference_mode():
            got = bb.model(x)
            hs = _tower(bb)(pixel_values=x, output_hidden_states=True).hidden_states
        by_hand = [h.mean((2, 3)) if h.ndim == 4 else h[:, prefix.get(kind, 0):].mean(1) for h in hs]
        assert torch.equal(got, torch.cat([by_hand[-1], by_hand[0]], 1)), kind
        assert None not in bb.model.body.taps, kind  # served by hooks, not output_hidden_states


def _alive_during_last_block(tower: torch.nn.Module, run) -> list[bool]:
    """Whether each block's output but the last two is still held when the last block ends, during ``run()``."""
    blocks = [m for m in tower.modules() if type(m).__name__ == "ViTLayer"]
    outs, alive = [], []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o if torch.is_tensor(o) else o[0])))
             for b in blocks]  # weak: the probe holds nothing itself
    hooks.append(blocks[-1].register_forward_hook(lambda m, a, o: alive.extend(r() is not None for r in outs[:-2])))
    with torch.inference_mode():
        run()
    for h in hooks:
        h.remove()
    return alive


def test_hf_layers_hold_only_the_asked_hidden_states(tmp_path):
    """A batch does not keep every hidden state until the end: those asked are pooled when made, and the raw blocks'
    outputs are dropped as the model goes (output_hidden_states held them all: ~3.4 GB for ViT-L fp16 at 256)."""
    T = transformers
    name = _save(T.ViTModel(T.ViTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                        intermediate_size=32, image_size=32, patch_size=8), add_pooling_layer=False),
                 tmp_path / "vit4")
    bb = create_backbone(name, layer="1+2")  # blocks 0 and 1's outputs
    x = torch.randn(2, 3, 32, 32)
    assert _alive_during_last_block(_tower(bb), lambda: bb.model(x)) == [False, False]
    held = _alive_during_last_block(_tower(bb), lambda: _tower(bb)(pixel_values=x, output_hidden_states=True))
    assert held == [True, True]  # the probe sees what output_hidden_states keeps


def test_hf_hidden_state_edited_after_it_is_made_comes_from_output_hidden_states(models):
    """A hidden state the model edits in place after making it has no tap (its version counter moved): that layer
    is taken from output_hidden_states as before, so the features stay the model's own."""
    def double_input(module, args, output) -> None:  # the last block's output, doubled once the norm has read it
        args[0].mul_(2)

    bb = create_backbone(f"hf/{models['vit']}")
    bb.model.model.layernorm.register_forward_hook(double_input)
    layered = at_layer(bb, "-1")
    assert layered.model.body.taps[-1] is None and None not in layered.model.body.taps[:-1]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hs = bb.model.model(pixel_values=x, output_hidden_states=True).hidden_states
        assert torch.equal(layered.model(x), hs[-1][:, 1:].mean(1))


def test_layers_are_refused_for_clip_in_one_line(tiny_clip, folder, tmp_path):
    with pytest.raises(BackboneError, match="not offered for clip/ backbones .*unnamed indices.*as an hf/ backbone"):
        create_backbone(f"clip/{tiny_clip}", "random", layer="-1")
    with pytest.raises(BackboneError, match="--layer is not offered for clip/ backbones"):
        list_layers(f"clip/{tiny_clip}")
    r = runner.invoke(app, ["extract", str(folder), "--backbone", f"clip/{tiny_clip}", "--weights", "random",
                            "--out", str(tmp_path / "s.h5"), "--workers", "0", "--layer", "-1"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --layer is not offered for clip/")
