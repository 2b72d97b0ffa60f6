"""Fine-tuning: parameter groups per strategy and family, freezing, BatchNorm, resume, checkpoint -> extract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torchvision.models import get_model

from probe.backbones import create_backbone, strip_classifier
from probe.extract import ExtractConfig, extract
from probe.finetune import (
    FinetuneConfig,
    FinetuneModel,
    adapt_first_conv,
    finetune,
    layer_groups,
    load_finetuned,
    lr_ladder,
    param_groups,
    thawed_count,
)
from probe.finetune import train as train_mod
from probe.finetune.groups import frozen_norms, set_trainable
from probe.store import FeatureStore

from .conftest import make_imagefolder

CNN = "timm/test_resnet"  # random-weight timm test ResNet: BatchNorm everywhere, 5 layer groups


def meta_model(name: str, classes: int = 3) -> FinetuneModel:
    """A stripped torchvision/timm model + head on the meta device: groups without allocating weights."""
    with torch.device("meta"):
        if name.startswith("timm/"):
            m = timm.create_model(name[5:], num_classes=0)
            dim = m.num_features
        else:
            m, dim, _ = strip_classifier(get_model(name, weights=None))
        return FinetuneModel(m, dim, classes)


def quick(**kw) -> FinetuneConfig:
    base = dict(backbone=CNN, weights="random", epochs=2, batch_size=4, workers=0, lr=1e-2, patience=0)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("ft") / "data", per_class=4, splits=("train", "val"))


# ------------------------------------------------------------------------------------ groups and lrs
EXPECTED_GROUPS = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],  # the seeds' ladder
    "efficientnet_b0": ["stem", "features.1…2", "features.3…4", "features.5…6", "features.7…8"],
    "mobilenet_v3_small": ["stem", "features.1…3", "features.4…6", "features.7…9", "features.10…12", "top"],
    "vgg11_bn": ["block1", "block2", "block3", "block4", "block5", "top"],
    "convnext_tiny": ["stem", "stage1", "stage2", "stage3", "stage4", "top"],
    "vit_b_16": ["stem", "encoder0-2", "encoder3-5", "encoder6-8", "encoder9-11", "top"],
    "timm/test_vit": ["cls_token+pos_embed+patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                      "blocks.4", "blocks.5+norm"],  # timm's own group_matcher(coarse=True)
    "timm/test_efficientnet": ["conv_stem+bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                               "blocks.4+conv_head+bn2"],
}


@pytest.mark.parametrize("name", list(EXPECTED_GROUPS))
def test_differential_lrs_per_family(name):
    model = meta_model(name)
    groups = layer_groups(model.backbone, name)
    assert [g.name for g in groups] == EXPECTED_GROUPS[name]
    pg = param_groups(model, groups, "differential", lr=1e-3, lr_mult=10, weight_decay=0.05)
    lr_of = {g["name"].removesuffix(" (no decay)"): g["lr"] for g in pg}  # both halves share the lr
    assert all(g["lr"] == lr_of[g["name"].removesuffix(" (no decay)")] for g in pg)
    n = len(groups)
    assert lr_of["head"] == 1e-3
    for i, g in enumerate(groups):  # geometric from lr/lr_mult (input side) to lr (last backbone group)
        assert lr_of[g.name] == pytest.approx(1e-4 * 10 ** (i / (n - 1)), rel=1e-12)
    assert lr_of[groups[0].name] == pytest.approx(1e-4) and lr_of[groups[-1].name] == pytest.approx(1e-3)
    ids = [id(p) for g in pg for p in g["params"]]  # every parameter exactly once
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "timm/test_vit"])
def test_no_weight_decay_on_norms_biases_tokens(name):
    model = meta_model(name)
    pg = param_groups(model, layer_groups(model.backbone, name), "full", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in pg:
        for p in g["params"]:
            token = names[id(p)].endswith(("class_token", "pos_embedding", "cls_token", "pos_embed"))
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 or token else 0.05), names[id(p)]
    assert any(g["weight_decay"] == 0 for g in pg) and any(g["weight_decay"] > 0 for g in pg)


def test_lrs_per_strategy():
    model = meta_model("resnet18")
    groups = layer_groups(model.backbone, "resnet18")
    fe = param_groups(model, groups, "feature-extract", lr=1e-3)
    assert {g["name"] for g in fe} == {"head", "head (no decay)"}
    full = param_groups(model, groups, "full", lr=3e-4)
    assert {g["lr"] for g in full} == {3e-4} and len(full) == 2 + 2 * 5
    grad = param_groups(model, groups, "gradual", lr=1e-3, lr_mult=100, thawed=2)  # head, then from the top
    assert [g["name"] for g in grad] == ["head", "head (no decay)", "layer4", "layer4 (no decay)", "layer3",
                                         "layer3 (no decay)"]
    assert grad[4]["lr"] == pytest.approx(1e-3 / 100 ** 0.25)
    assert lr_ladder(3, 1e-3, 100) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert [thawed_count("gradual", 5, e, unfreeze_every=2) for e in range(13)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]


def test_generic_fallback_logs(caplog):
    caplog.set_level("INFO")
    model = meta_model("densenet121")
    groups = layer_groups(model.backbone, "densenet121")
    assert len(groups) == 5 and "no known layer layout" in caplog.text


# ------------------------------------------------------------------------------------ freezing and BN
def test_set_trainable_and_frozen_norms():
    bb = create_backbone(CNN, "random")
    model = FinetuneModel(bb.model, bb.dim, 3)
    groups = layer_groups(model.backbone, CNN)
    set_trainable(model, groups, 2)
    params = dict(model.backbone.named_parameters())
    for i, g in enumerate(groups):
        assert all(params[n].requires_grad == (i >= 3) for n in g.params)
    frozen = frozen_norms(model, groups, 2)
    names = {m: n for n, m in model.backbone.named_modules()}
    assert frozen and all(not names[m].startswith(("layer3", "layer4")) for m in frozen)


def test_gradual_freezing_state_per_epoch(data, tmp_path, monkeypatch):
    seen: dict[int, dict] = {}
    epoch = {"n": 0}

    class Spy(FinetuneModel):
        def forward(self, x):
            if self.training and epoch["n"] not in seen:  # first training step of each epoch
                seen[epoch["n"]] = {
                    "grad": {n.split(".")[0]: p.requires_grad for n, p in self.backbone.named_parameters()},
                    "bn_train": {n.split(".")[0]: m.training for n, m in self.backbone.named_modules()
                                 if isinstance(m, nn.BatchNorm2d)},
                }
            return super().forward(x)

    monkeypatch.setattr(train_mod, "FinetuneModel", Spy)
    s = finetune(data, tmp_path / "run", quick(strategy="gradual", epochs=3),
                 on_epoch=lambda rec: epoch.update(n=rec["epoch"]))
    order = ["layer4", "layer3", "layer2", "layer1"]
    for e in range(3):
        thawed = set(order[:e])
        assert seen[e]["grad"] == {k: k in thawed for k in seen[e]["grad"]}, e
        assert seen[e]["bn_train"] == {k: k in thawed for k in seen[e]["bn_train"]}, e
    rows = [json.loads(line) for line in open(s["metrics"])]
    assert [r["thawed_groups"] for r in rows] == [[], ["layer4.0"], ["layer3.0", "layer4.0"]]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]
    assert set(rows[2]["lr"]) >= {"head", "layer4.0", "layer3.0"} and "layer2.0" not in rows[2]["lr"]
    opt_groups = torch.load(s["last"], weights_only=True)["optimizer"]["param_groups"]
    assert [g["name"] for g in opt_groups][:4] == ["head", "head (no decay)", "layer4.0", "layer4.0 (no decay)"]


def test_feature_extract_leaves_backbone_and_batchnorm_untouched(data, tmp_path):
    before = create_backbone(CNN, "random").model.state_dict()
    s = finetune(data, tmp_path / "fe", quick(strategy="feature-extract"))
    after = torch.load(s["last"], weights_only=True)["model"]
    bn = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn and all(torch.equal(before[k], after[f"backbone.{k}"]) for k in bn)
    assert all(torch.equal(before[k], after[f"backbone.{k}"]) for k in before)  # weights too
    assert s["trainable_params"] == after["head.weight"].numel() + 3  # the head alone
    assert not torch.equal(after["head.weight"], torch.zeros_like(after["head.weight"]))


def test_full_updates_batchnorm_statistics(data, tmp_path):
    before = create_backbone(CNN, "random").model.state_dict()
    after = torch.load(finetune(data, tmp_path / "full", quick(strategy="full", epochs=1))["last"],
                       weights_only=True)["model"]
    assert not torch.equal(before["bn1.running_mean"], after["backbone.bn1.running_mean"])


# ------------------------------------------------------------------------------------------ resume
def test_resume_equals_uninterrupted(data, tmp_path):
    cfg = quick(strategy="gradual", epochs=2, augment="seeds")
    straight = finetune(data, tmp_path / "a", cfg)

    def crash(rec):
        if rec["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "b", cfg, on_epoch=crash)
    with pytest.raises(ValueError, match="pass --resume"):
        finetune(data, tmp_path / "b", cfg)
    resumed = finetune(data, tmp_path / "b", quick(strategy="gradual", epochs=2, augment="seeds", resume=True))
    a = torch.load(straight["last"], weights_only=True)
    b = torch.load(resumed["last"], weights_only=True)
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6, rtol=0), k
    assert a["step"] == b["step"] and len(b["history"]) == 2
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert len(open(resumed["metrics"]).read().splitlines()) == 2
    with pytest.raises(ValueError, match="other settings.*lr"):
        finetune(data, tmp_path / "b", quick(strategy="gradual", epochs=2, lr=0.5, resume=True))


# ------------------------------------------------------------------------------ checkpoint -> extract
def test_best_checkpoint_extracts_finetuned_features(data, tmp_path):
    s = finetune(data, tmp_path / "run", quick(strategy="differential", epochs=1))
    model, meta = load_finetuned(s["best"])
    assert meta["backbone"] == CNN and meta["strategy"] == "differential" and meta["classes"] == ["cat", "dog", "fox"]
    out = tmp_path / "ft.h5"
    extract(data, out, ExtractConfig(backbone=None, weights=s["best"], workers=0, dtype="float32"))
    store = FeatureStore(out)
    bb = create_backbone(None, s["best"])
    from probe.data import load_image

    u8 = torch.stack([bb.pixels(load_image(str(store.root / p))) for p in store.paths()])  # extract's pixel path
    x = bb.pixels.normalise(u8).contiguous()  # (N, 3, H, W)
    with torch.no_grad():
        own = model.backbone(x).numpy()  # (N, dim)
        rand = create_backbone(CNN, "random").model(x).numpy()
    np.testing.assert_allclose(store.features(), own, atol=1e-4, rtol=1e-4)
    assert not np.allclose(store.features(), rand, atol=1e-3)  # the fine-tuned weights, not the start
    assert math.isclose(meta["metrics"]["val_acc"], s["best_val_acc"])


# ---------------------------------------------------------------------------------------- in_chans
def test_first_conv_surgery_from_rgb_weights():
    for name in ("resnet18", CNN):
        bb = create_backbone(name, "random")
        conv = bb.model.conv1 if name == "resnet18" else bb.model.conv1[0]
        rgb = conv.weight.detach().clone()  # (O, 3, k, k)
        adapt_first_conv(bb.model, 5)
        new = (bb.model.conv1 if name == "resnet18" else bb.model.conv1[0]).weight
        assert new.shape[1] == 5
        assert torch.equal(new[:, :3], rgb) and torch.allclose(new[:, 3:], rgb.mean(1, keepdim=True).expand(-1, 2, -1,
                                                                                                            -1))
        with torch.no_grad():
            assert bb.model.eval()(torch.randn(2, 5, 64, 64)).shape == (2, bb.dim)
    bb = create_backbone(CNN, "random")
    rgb = bb.model.conv1[0].weight.detach().clone()
    adapt_first_conv(bb.model, 1)
    assert torch.allclose(bb.model.conv1[0].weight, rgb.sum(1, keepdim=True))  # grey == its RGB copy


def test_five_channel_npy_training(tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for c in range(2):
        for k in range(6):
            np.save(root / f"{c}_{k}.npy", (rng.random((24, 24, 5)) * 60 + c * 150).astype(np.uint8))
            rows.append(f"{c}_{k}.npy,class{c},{'val' if k >= 4 else 'train'}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    s = finetune(root / "data.csv", tmp_path / "run", quick(in_chans=5, epochs=1, strategy="full"))
    assert s["train_images"] == 8 and s["val_images"] == 4 and not s["skipped"]
    model, meta = load_finetuned(s["best"])
    assert meta["in_chans"] == 5 and model.backbone.conv1[0].in_channels == 5


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw, msg", [({"strategy": "fast"}, "unknown strategy 'fast'"),
                                     ({"lr_mult": 0.5}, "lr-mult must be >= 1"),
                                     ({"augment": "mixup"}, "expected one of seeds, randaugment, none")])
def test_config_errors_teach(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FinetuneConfig(**kw)


def test_unlabelled_data_is_refused(tmp_path):
    from probe.data import DatasetError

    from .conftest import make_image

    for k in range(3):
        make_image(tmp_path / "flat" / f"{k}.png", k)
    with pytest.raises(DatasetError, match="no labels"):
        finetune(tmp_path / "flat", tmp_path / "run", quick())
