"""CLIP models through ``open_clip``: ``clip/<model>:<pretrained>`` backbones and the text tower beside them.

Names:
    * ``clip/ViT-B-32:openai``, ``clip/ViT-L-14:laion2b_s32b_b82k``: an open_clip architecture and pretrained tag
      (``open_clip.list_pretrained()``); the weights come from the local HF cache, or are downloaded once;
    * ``clip/ViT-B-32:/path/to/checkpoint.pt``: that architecture with a local open_clip checkpoint;
    * ``clip/ViT-B-32`` with ``weights='random'``: the architecture at random (tests); a ``weights=PATH`` checkpoint
      file also fits any name (a fine-tuned CLIP: both towers);
    * ``clip/hf-hub:org/repo`` and ``clip/local-dir:/path``: open_clip's own schemas, config and weights together.

The image features stored by ``probe extract`` are ``encode_image`` -- after the visual projection, so in the
space of the text tower -- and **not** L2-normalised: a store keeps the model's output as it is, as for every other
backbone, and probe's search (cosine) and zero-shot heads normalise where the CLIP convention needs it. The
``weights_sha256`` of a clip/ backbone covers both towers, so a text tower can be checked against a store.
``open_clip_torch`` is an optional extra: ``pip install 'probe[clip]'``.

Example:
    >>> tower = text_tower_for(store.attrs)       # the store's CLIP, its text side
    >>> T = tower.encode(["a photo of a cat", "a photo of a dog"])   # (2, D) float32, unit rows
    >>> X = store.features / np.linalg.norm(store.features, axis=1, keepdims=True)
    >>> (X @ T.T).argmax(1)                       # zero-shot: the nearest prompt
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import BackboneError, ProbeError

log = logging.getLogger(__name__)

PREFIX = "clip/"
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names that carry their own config and weights
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # what a pretrained tag says about pixels


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise BackboneError(f"clip/ backbones need the open_clip_torch package ({e}): pip install 'probe[clip]' "
                            "(or pip install 'open_clip_torch>=2.24')") from e
    return open_clip


def is_clip(attrs: Mapping[str, Any]) -> bool:
    """Whether a store's, head's or index's identity was made by a clip/ backbone (so it has a text tower)."""
    return str(attrs.get("backbone", "")).startswith(PREFIX)


# ------------------------------------------------------------------------------------------- names
def parse_name(name: str) -> tuple[str, str | None]:
    """``clip/<model>[:<pretrained>]`` -> (model, pretrained tag or absolute file, or None).

    Example:
        >>> parse_name("clip/ViT-B-32:openai")
        ('ViT-B-32', 'openai')
    """
    rest = name[len(PREFIX):]
    if rest.startswith(SCHEMAS):
        return rest, None
    model, _, pretrained = rest.partition(":")
    if not model:
        raise BackboneError(f"backbone {name!r} names no model: expected clip/<model>:<pretrained>, "
                            "e.g. clip/ViT-B-32:openai")
    if pretrained and (os.sep in pretrained or Path(pretrained).expanduser().is_file()):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone {name!r}: checkpoint {str(path)!r} does not exist")
        pretrained = str(path.resolve())
    return model, pretrained or None


def canonical_name(name: str) -> str:
    """The name a store records: a checkpoint path as an absolute path."""
    model, pretrained = parse_name(name)
    return PREFIX + model + (f":{pretrained}" if pretrained else "")


def check_name(name: str) -> None:
    """Raise BackboneError, with close matches, for an architecture or tag open_clip does not know."""
    oc = import_open_clip()
    model, pretrained = parse_name(name)
    if model.startswith(SCHEMAS):
        return
    if model not in oc.list_models():
        close = difflib.get_close_matches(model, oc.list_models(), n=5)
        raise BackboneError(f"unknown open_clip model {model!r} in backbone {name!r}"
                            + (f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else "")
                            + " (open_clip.list_models())")
    if pretrained and not os.path.isfile(pretrained) and not oc.get_pretrained_cfg(model, pretrained):
        tags = oc.list_pretrained_tags_by_model(model)
        raise BackboneError(f"unknown pretrained tag {pretrained!r} for {model}: expected "
                            + (", ".join(tags) if tags else "a checkpoint file (open_clip has no tags for it)"))


def _cached_tag(cfg: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """(cached checkpoint or None, where it comes from, how to fetch it) for an open_clip pretrained config."""
    from huggingface_hub import try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):  # open_clip prefers a .safetensors twin
            names.insert(0, filename.removesuffix(".bin") + ".safetensors")
        for f in names:
            hit = try_to_load_from_cache(repo, f)
            if isinstance(hit, str):
                return hit, "", ""
        return None, f"https://huggingface.co/{repo}", f"run `huggingface-cli download {repo}`"
    url = cfg.get("url", "")
    target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return (target if url and os.path.isfile(target) else None), url, f"download {url} to {target}"


def weights_available(name: str) -> bool:
    """Whether ``clip/<model>:<pretrained>`` loads without a network."""
    oc = import_open_clip()
    model, pretrained = parse_name(name)
    if model.startswith("local-dir:"):
        return Path(model[len("local-dir:"):]).is_dir()
    if model.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model[len("hf-hub:"):], "open_clip_config.json"), str)
    if not pretrained:
        return False
    if os.path.isfile(pretrained):
        return True
    cfg = oc.get_pretrained_cfg(model, pretrained)
    return bool(cfg) and _cached_tag(cfg)[0] is not None


def describe(name: str) -> dict[str, Any]:
    """One row of `probe backbones` for a clip/ name: its embedding width and input size from open_clip's config."""
    oc = import_open_clip()
    model, _ = parse_name(name)
    cfg = oc.get_model_config(model) if not model.startswith(SCHEMAS) else None
    size = (cfg or {}).get("vision_cfg", {}).get("image_size")
    return {"name": name, "family": "clip", "dim": (cfg or {}).get("embed_dim"),
            "input_size": size[-1] if isinstance(size, (list, tuple)) else size, "offline": weights_available(name)}


def list_names(pattern: str = "*") -> list[str]:
    """Every ``clip/<model>:<tag>`` open_clip has pretrained weights for, models matching ``pattern`` (fnmatch)."""
    from fnmatch import fnmatch

    return [f"{PREFIX}{m}:{t}" for m, t in import_open_clip().list_pretrained() if fnmatch(m, pattern)]


# ------------------------------------------------------------------------------------------ loading
def _no_download(oc: Any) -> dict[str, bool]:
    """Keyword arguments that keep open_clip from fetching base tower weights (a timm image tower's, an HF text
    tower's) when the CLIP weights come from elsewhere: ``pretrained_text`` from open_clip 3, ``pretrained_hf``
    before."""
    import inspect

    text = "pretrained_text" if "pretrained_text" in inspect.signature(oc.create_model).parameters else "pretrained_hf"
    return {"pretrained_image": False, text: False}


def load_clip(name: str, weights: str | None = None, state: dict[str, torch.Tensor] | None = None,
              ) -> tuple[nn.Module, Any, str]:
    """(open_clip model in eval mode, its eval image transform, weights identity) for a clip/ name.

    ``weights``: None for the name's pretrained weights, ``'random'``, or a checkpoint file (its tensors in
    ``state``, as create_backbone read them) loaded into both towers."""
    from .backbones import RANDOM_WEIGHTS, WeightsUnavailableError, _local_weights, _reachable

    oc = import_open_clip()
    check_name(name)
    model_name, pretrained = parse_name(name)
    tag_cfg = oc.get_pretrained_cfg(model_name, pretrained) if pretrained and not os.path.isfile(pretrained) else {}
    pixels = {f"image_{k}": tag_cfg[k] for k in _PREPROCESS_KEYS if k in (tag_cfg or {})}  # the tag's pixels
    if (weights in RANDOM_WEIGHTS or state is not None) and model_name.startswith(SCHEMAS):
        raise BackboneError(f"{name} carries its own weights: 'random' or a checkpoint file needs an open_clip model "
                            "name, e.g. clip/ViT-B-32")
    no_download = _no_download(oc)
    random_init = {"pretrained": None, **no_download}
    if weights in RANDOM_WEIGHTS or state is not None:
        model, _, tf = oc.create_model_and_transforms(model_name, **random_init, **pixels)
        ident = _local_weights(model, weights, state)  # "random", or the file loaded into both towers
    elif weights:
        raise BackboneError(f"weights {weights!r} for {name}: expected 'random' or an existing checkpoint file; "
                            f"for open_clip pretrained weights write the tag in the name, e.g. clip/ViT-B-32:openai")
    elif model_name.startswith(SCHEMAS):
        try:
            model, _, tf = oc.create_model_and_transforms(model_name)
        except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/FileNotFoundError/ValueError alike
            raise WeightsUnavailableError(f"{name}: cannot load {model_name} ({str(e).splitlines()[0][:200]}); "
                                          "offline, point clip/local-dir:FOLDER at a downloaded copy") from e
        ident = f"open_clip:{model_name}"
    elif pretrained is None:
        tags = oc.list_pretrained_tags_by_model(model_name)
        raise BackboneError(f"{name} names no pretrained weights: write clip/{model_name}:<tag> "
                            f"({', '.join(tags) or 'open_clip has no tags for it'}) or clip/{model_name}:<checkpoint "
                            "file>, or pass weights 'random'")
    elif os.path.isfile(pretrained):
        model, _, tf = oc.create_model_and_transforms(model_name, pretrained=pretrained, **no_download)
        ident = f"open_clip:file:{pretrained}"
    else:
        cached, url, how = _cached_tag(tag_cfg)
        if cached is None and not _reachable(url or "https://huggingface.co"):
            raise WeightsUnavailableError(
                f"pretrained weights for {name} are not cached on this machine and {url} cannot be reached: on a "
                f"machine with internet {how} and copy the file (or the HF cache folder) here, or pass "
                f"--backbone clip/{model_name}:/path/to/checkpoint")
        # from the cache by path (no network call), with the tag's preprocessing; else downloaded by tag
        model, _, tf = oc.create_model_and_transforms(model_name, pretrained=cached or pretrained, **pixels)
        ident = f"open_clip:{pretrained}"
    return model.float().eval().requires_grad_(False), tf, ident


def image_transform(tf: Any) -> tuple[Any, dict[str, Any]]:
    """open_clip's eval transform without its RGB conversion step (probe hands it RGB already), so a Compose of
    Resize / CenterCrop / ToTensor / Normalize maps onto the uint8 pixel path; and its record for the identity."""
    from torchvision import transforms as T

    steps = [t for t in getattr(tf, "transforms", [tf])  # minus MaybeConvertMode (3.x), _convert_to_rgb (2.x)
             if type(t).__name__ not in ("MaybeConvertMode", "function")]
    tf = T.Compose(steps)
    pre: dict[str, Any] = {"library": "open_clip"}
    for t in steps:
        if isinstance(t, T.Resize):
            pre.update(resize=t.size if isinstance(t.size, int) else list(t.size),
                       interpolation=getattr(t.interpolation, "value", str(t.interpolation)))
        elif isinstance(t, T.CenterCrop) or type(t).__name__ == "CenterCropOrPad":
            pre["crop"] = [int(v) for v in t.size]
        elif isinstance(t, T.Normalize):
            pre.update(mean=[float(v) for v in t.mean], std=[float(v) for v in t.std])
    h, w = pre.get("crop") or pre.get("resize")
    pre.update(crop=h if h == w else [h, w], input_size=[3, h, w], repr=repr(tf).replace("\n", " "))
    return tf, pre


class ClipImage(nn.Module):
    """(B, 3, H, W) -> (B, D): open_clip's ``encode_image`` without normalisation (the image tower and its
    projection). Holds the visual tower only: the text tower is built when asked for (``text_tower_for``)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out  # CoCa's visual returns (pooled, tokens)


def clip_backbone(name: str, weights: str | None, state: dict[str, torch.Tensor] | None = None):
    """``clip/<model>:<pretrained>`` -> Backbone of the image tower; ``weights_sha256`` is of both towers."""
    from .backbones import Backbone, state_dict_sha256

    oc = import_open_clip()
    model, tf, ident = load_clip(name, weights, state)
    tf, pre = image_transform(tf)
    pre["open_clip"] = oc.__version__
    visual = ClipImage(model.visual)
    with torch.inference_mode():
        dim = int(visual(torch.zeros(1, *pre["input_size"])).shape[1])
    return Backbone(canonical_name(name), visual, dim, tf, pre, ident,
                    weights_sha256=state_dict_sha256(model.state_dict()),
                    extra={"open_clip": oc.__version__, "architecture": type(model).__name__})


# ------------------------------------------------------------------------------------------ text tower
class TextTower:
    """The text side of a clip/ backbone: strings -> (N, D) float32 unit vectors in the space of its image features.

    ``identity``: backbone, model, pretrained, weights and weights_sha256 -- equal to those of the stores the image
    side made, so a text embedding is only ever compared with image features of the same CLIP.

    Example:
        >>> tower = text_tower_for(store.attrs)
        >>> tower.encode(["a photo of a bee"]).shape
        (1, 512)
    """

    def __init__(self, model: nn.Module, tokenizer: Any, identity: dict[str, Any], device: str = "auto"):
        from .device import resolve_device

        self.device = resolve_device(device)
        model.visual = nn.Identity()  # the image tower is not needed here
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.identity = tokenizer, dict(identity)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (N, D) float32, each row L2-normalised (CLIP's convention for text embeddings)."""
        if isinstance(texts, str):
            raise ProbeError("encode takes a list of texts, got one string: pass [text]")
        out = []
        for s in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[s: s + batch_size])).to(self.device)  # (B, context_length) ints
            f = self.model.encode_text(tokens).float()  # (B, D)
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if isinstance(
            getattr(self.model, "text_projection", None), torch.Tensor) else int(self.encode(["a"]).shape[1])

    def __repr__(self) -> str:
        return f"TextTower({self.identity['backbone']}, dim={self.dim}, device={self.device})"


def text_tower(name: str, weights: str | None = None, device: str = "auto") -> TextTower:
    """The text tower of ``clip/<model>:<pretrained>`` (``weights`` as create_backbone takes it)."""
    from .backbones import RANDOM_WEIGHTS, load_checkpoint, state_dict_sha256

    oc = import_open_clip()
    if not name.startswith(PREFIX):
        raise ProbeError(f"backbone {name} has no text tower: text needs a clip/... backbone "
                         "(e.g. clip/ViT-B-32:openai)")
    state = load_checkpoint(weights)[0] if weights and weights not in RANDOM_WEIGHTS else None
    if weights in RANDOM_WEIGHTS:
        torch.manual_seed(0)  # the same random model create_backbone builds
    model, _, ident = load_clip(name, weights, state)
    model_name, pretrained = parse_name(name)
    identity = {"backbone": canonical_name(name), "model": model_name, "pretrained": pretrained, "weights": ident,
                "weights_sha256": state_dict_sha256(model.state_dict())}
    return TextTower(model, oc.get_tokenizer(model_name), identity, device)


def text_tower_for(attrs: Mapping[str, Any], device: str = "auto") -> TextTower:
    """Rebuild the text tower of the CLIP recorded in a store's, index's or head's identity attributes; refuses
    another backbone, and weights whose checksum differs from the recorded one.

    Example:
        >>> text_tower_for(h5py.File("cache/photos.h5").attrs).encode(["a dog"])
    """
    from .embedder import weights_arg

    name = str(attrs.get("backbone", ""))
    if not is_clip(attrs):
        raise ProbeError(f"this store's backbone {name or '(none recorded)'} has no text tower: text needs a clip/... "
                         "backbone: extract with --backbone clip/<model>:<pretrained>, e.g. clip/ViT-B-32:openai")
    if attrs.get("layer"):
        raise ProbeError(f"these features are layer {attrs['layer']} of {name}, not its image embedding: the text "
                         "tower lives in the space of the final embedding (extract without --layer)")
    tower = text_tower(name, weights_arg(str(attrs.get("weights", ""))), device)
    recorded = attrs.get("weights_sha256")
    if recorded and recorded != tower.identity["weights_sha256"]:
        raise BackboneError(f"the weights of {name} available now (sha256 {tower.identity['weights_sha256'][:12]}) "
                            f"are not the ones these features were made with ({str(recorded)[:12]}): restore those "
                            "weights, or extract the features again with the weights you have")
    return tower
