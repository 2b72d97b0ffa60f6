"""Hugging Face ``transformers`` image models as backbones: ``hf/<repo id>`` or ``hf/<local folder>``.

The model comes from ``AutoModel.from_pretrained`` and its preprocessing from the image processor saved beside it
(``AutoImageProcessor``), rebuilt as a torchvision transform so the extraction loop, the uint8 pixel path and the
pixel-limit checks run it as they run torchvision's and timm's. ``transformers`` is an optional extra:
``pip install 'probe[hf]'``.

Which output is the embedding, per family (``HF_OUTPUT`` and ``choose_output``; recorded as ``preprocess["output"]``,
so the config key changes with it):

* **dual encoders** (``CLIPModel``, ``SiglipModel``, ... anything with ``get_image_features``): the projected image
  embedding, the one their text tower is aligned with;
* **ViT, DeiT, ViT-MSN, DINOv2** (``cls``): the class token of ``last_hidden_state`` after the final norm -- what
  their classifiers read. ViT's and DeiT's ``pooler_output`` is a BERT-style dense+tanh that their image
  classifiers never use (and that ``google/vit-*`` checkpoints do not even hold), so it is not built;
  DINOv2's ``pooler_output`` *is* that class token;
* **everything else with a ``pooler_output``** (``pooler``): ConvNeXt (global average + LayerNorm), ResNet, RegNet,
  EfficientNet, MobileNet (global average), BEiT and Data2Vec-vision (mean patch token + LayerNorm), Swin
  (average), ``CLIPVisionModel`` (post-LayerNorm class token, *before* the projection);
* **no pooler** (``mean``): the mean of ``last_hidden_state`` over its positions (tokens, or the spatial grid).

Example:
    >>> bb = create_backbone("hf/facebook/dinov2-small")  # from the local HF cache, or downloaded once
    >>> bb.dim, bb.preprocess["output"], bb.preprocess["crop"]
    (384, 'cls', 224)
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from .errors import BackboneError
from .transforms import centre_crop

log = logging.getLogger(__name__)

PREFIX = "hf/"
HF_OUTPUT = {"vit": "cls", "deit": "cls", "vit_msn": "cls", "dinov2": "cls", "dinov2_with_registers": "cls"}
NO_POOLER = ("vit", "deit")  # their pooler is a dense+tanh no classifier reads: built without it (add_pooling_layer)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_TENSOR_INTERP = ("nearest", "bilinear", "bicubic")  # what torch's uint8 resize kernels have (the uint8 pixel path)


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise BackboneError(f"hf/ backbones need the transformers package ({e}): pip install 'probe[hf]' "
                            "(or pip install 'transformers>=4.40')") from e
    return transformers


# ------------------------------------------------------------------------------------------- names
def source_of(name: str) -> tuple[str, bool]:
    """``hf/<x>`` -> (repo id or absolute folder, is_local). A path that exists, or that looks like one (starts with
    ``/``, ``.`` or ``~``, or has more than one ``/``), is a local folder; anything else is a hub repo id."""
    src = name[len(PREFIX):]
    if not src:
        raise BackboneError(f"backbone {name!r} names no model: expected hf/<repo id> (hf/google/vit-base-patch16-224) "
                            "or hf/<folder saved by save_pretrained>")
    path = Path(src).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if src.startswith(("/", ".", "~")) or src.count("/") > 1:
        raise BackboneError(f"backbone {name!r}: folder {str(path)!r} does not exist (expected a folder holding a "
                            "transformers model and its image processor, as save_pretrained writes them)")
    return src, False


def canonical_name(name: str) -> str:
    """The name a store records: a local folder as its absolute path (so the store can be queried from anywhere)."""
    src, local = source_of(name)
    return PREFIX + src if local else name


def _cached(repo: str) -> bool:
    """Whether the config and a weights file of hub repo ``repo`` are in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in WEIGHT_FILES)


def weights_available(name: str) -> bool:
    """Whether ``hf/<x>`` loads without a network: a local folder with a config, or a repo in the HF cache."""
    src, local = source_of(name)
    return (Path(src) / "config.json").is_file() if local else _cached(src)


def offline_message(name: str, repo: str) -> str:
    """One line: what is missing, where it would come from, how to get it here."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"pretrained weights for {name} are not cached on this machine and https://huggingface.co/{repo} cannot "
            f"be reached: on a machine with internet run `huggingface-cli download {repo}` and copy "
            f"{HF_HUB_CACHE}/models--{repo.replace('/', '--')} to the same place here, or save the model and its "
            f"image processor with save_pretrained(FOLDER) and pass --backbone hf/FOLDER")


# ------------------------------------------------------------------------------------ preprocessing
def _interp(resample: Any):
    """A processor's ``resample`` (PIL code, PILImageResampling or InterpolationMode) -> InterpolationMode."""
    from torchvision.transforms import InterpolationMode

    if isinstance(resample, InterpolationMode):
        return resample
    code = int(getattr(resample, "value", resample))
    if code not in _PIL_RESAMPLE:
        raise BackboneError(f"unknown resample {resample!r} in the image processor")
    return InterpolationMode(_PIL_RESAMPLE[code])


def _size(d: Any, *keys: str) -> list[int | None]:
    return [None if d is None else d.get(k) for k in keys]  # dict (transformers 4) or SizeDict (5)


class _PilCompose:
    """The processor's steps on PIL images only: its resample has no uint8 tensor kernel (lanczos, box, hamming),
    so the Embedder keeps the PIL path (PixelTransform.from_transform reads only a Compose)."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        return "PilCompose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class HFCenterCrop(T.CenterCrop):
    """transformers' centre crop: its offset is floor((size - crop) / 2), where torchvision's CenterCrop rounds -- one
    pixel further right/down whenever half the difference ends in .5 and rounds up (43 wide cropped to 32: 5, not
    6). A CenterCrop whose ``offset`` the uint8 pixel path reads (``probe.transforms.read_steps``), so both paths
    crop where the processor does."""

    offset = "floor"

    def forward(self, img):
        return centre_crop(img, self.size, self.offset)


def processor_transform(proc: Any) -> tuple[Any, dict[str, Any]]:
    """An image processor -> (the equivalent torchvision transform, PIL RGB -> (3, H, W) float, and its record).

    Resize as the processor does (to ``size`` height x width; or the shortest edge to ``size["shortest_edge"]``,
    ConvNeXt's ``crop_pct`` rule included), centre crop to ``crop_size`` when ``do_center_crop``, then
    ``(pixel * rescale_factor - mean) / std`` written as one Normalize after ToTensor. Settings without such a form
    (padding, ``longest_edge``, another ``crop_pct`` rule) raise BackboneError rather than drift silently.
    """
    kind = type(proc).__name__.removesuffix("Fast").removesuffix("Pil")
    unsupported = [k for k in ("do_pad", "include_top", "rescale_offset", "do_reduce_labels") if getattr(proc, k, None)]
    if unsupported:
        raise BackboneError(f"{kind} with {', '.join(unsupported)} has no torchvision equivalent in probe yet")
    interp = _interp(getattr(proc, "resample", 2))
    steps: list = []
    record: dict[str, Any] = {"library": "transformers", "processor": kind}
    h = w = None
    if getattr(proc, "do_resize", True):
        height, width, short = _size(getattr(proc, "size", None), "height", "width", "shortest_edge")
        crop_pct = getattr(proc, "crop_pct", None)
        if height and width:
            steps.append(T.Resize((int(height), int(width)), interpolation=interp, antialias=True))
            h, w = int(height), int(width)
            record["resize"] = [h, w]
        elif short and crop_pct is not None and kind == "ConvNextImageProcessor":
            if short < 384:  # ConvNeXt's rule: shortest edge to short / crop_pct, then a short x short centre crop
                steps += [T.Resize(int(short / crop_pct), interpolation=interp, antialias=True),
                          HFCenterCrop(int(short))]
                record.update(resize=int(short / crop_pct), crop_pct=float(crop_pct))
            else:  # from 384 up: straight to short x short, no crop
                steps.append(T.Resize((int(short), int(short)), interpolation=interp, antialias=True))
                record["resize"] = [int(short), int(short)]
            h = w = int(short)
        elif short and crop_pct is None:
            steps.append(T.Resize(int(short), interpolation=interp, antialias=True))
            record["resize"] = int(short)
        else:
            raise BackboneError(f"{kind} resizes to {getattr(proc, 'size', None)!r}"
                                + (f" with crop_pct {crop_pct}" if crop_pct is not None else "")
                                + ": probe maps only height x width, or shortest_edge (ConvNeXt's crop_pct included)")
    if getattr(proc, "do_center_crop", False):
        ch, cw = _size(getattr(proc, "crop_size", None), "height", "width")
        if not (ch and cw):
            raise BackboneError(f"{kind} centre-crops to {getattr(proc, 'crop_size', None)!r}: expected height, width")
        steps.append(HFCenterCrop((int(ch), int(cw))))
        h, w = int(ch), int(cw)
    if h is None:
        raise BackboneError(f"{kind} gives no fixed input size (size {getattr(proc, 'size', None)!r}, no centre crop)")
    r = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
    mean, std = ((list(proc.image_mean), list(proc.image_std)) if getattr(proc, "do_normalize", True)
                 else ([0.0] * 3, [1.0] * 3))
    # ToTensor gives pixel / 255; the processor computes (pixel * r - mean) / std = (t - mean/(255r)) / (std/(255r))
    scale = 255.0 * r
    steps += [T.ToTensor(), T.Normalize([m / scale for m in mean], [s / scale for s in std])]
    interp_name = interp.value
    tf = T.Compose(steps) if interp_name in _TENSOR_INTERP else _PilCompose(steps)
    record.update(crop=h if h == w else [h, w], input_size=[3, h, w], interpolation=interp_name,
                  mean=[float(m) for m in mean], std=[float(s) for s in std], rescale_factor=r,
                  repr=repr(tf).replace("\n", " "))
    return tf, record


# ------------------------------------------------------------------------------------------ the model
def choose_output(model: nn.Module, out: Any) -> str:
    """Which output is the embedding (the module docstring's table); ``out`` is one forward's output."""
    if hasattr(model, "get_image_features"):
        return "image_features"
    kind = getattr(model.config, "model_type", "")
    if kind in HF_OUTPUT:
        return HF_OUTPUT[kind]
    if getattr(out, "pooler_output", None) is not None:
        return "pooler"
    return "mean"


Tap = tuple[str, str, int | None]  # (module path, "in" or "out", position in its args/output tuple; None: itself)


def _tensors(value: Any) -> list[tuple[int | None, torch.Tensor]]:
    """A module's positional args or output -> its tensors with their positions (None: the output itself)."""
    if torch.is_tensor(value):
        return [(None, value)]
    if isinstance(value, (tuple, list)):
        return [(k, t) for k, t in enumerate(value) if torch.is_tensor(t)]
    return []  # a ModelOutput (a dict): the model's own result, not a layer


def _version(t: torch.Tensor) -> int:
    """How often ``t`` was modified in place: 0 for an inference tensor (a parameter loaded under inference_mode),
    which cannot be modified outside inference_mode, where the survey runs."""
    return 0 if t.is_inference() else t._version


class HFFeatures(nn.Module):
    """(B, 3, H, W) normalised pixels -> (B, D): one output of a transformers image model (``choose_output``).

    Its layers (``hidden_states``) are surveyed once (``survey``): their shapes, and where the model makes each one,
    so ``layer_outputs`` can take the asked ones there with hooks instead of ``output_hidden_states``.
    """

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output
        self.shapes: list[torch.Size] = []  # per hidden state, prefix tokens left out: set by survey()
        self.taps: list[Tap | None] = []  # per hidden state: the module making it (None: none found)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.model.get_image_features if self.output == "image_features" else self.model
        return self.embedding(run(pixel_values=x))

    def embedding(self, out: Any) -> torch.Tensor:
        """One forward's output (a dual encoder's ``get_image_features``) -> (B, D): the output ``output`` names."""
        if self.output == "image_features":  # a tensor in transformers 4, an output with pooler_output in 5
            return (out if torch.is_tensor(out) else out.pooler_output).flatten(1)
        if self.output == "cls":
            return out.last_hidden_state[:, 0]  # (B, N, C) -> (B, C)
        if self.output == "pooler":
            return out.pooler_output.flatten(1)  # conv models' is (B, C, 1, 1)
        h = out.last_hidden_state
        return h.mean((2, 3)) if h.ndim == 4 else h.mean(1)  # (B, C, H, W) or (B, N, C) -> (B, C)

    @property
    def tower(self) -> nn.Module | None:
        """The image model: a dual encoder's vision tower, else the model itself."""
        return getattr(self.model, "vision_model", None) if self.output == "image_features" else self.model

    def _hidden_states(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> transformers' ``hidden_states`` of the tower (``output_hidden_states=True``), as made."""
        why = ""
        try:
            out = self.tower(pixel_values=x, output_hidden_states=True) if self.tower is not None else None
        except TypeError as e:  # a forward without output_hidden_states (or another argument error: said)
            out, why = None, f" ({e})"
        if getattr(out, "hidden_states", None) is None:
            raise BackboneError(f"{type(self.model).__name__} exposes no hidden_states of its image tower{why}, so "
                                "it offers no intermediate layers: use its embedding (no --layer)")
        return out.hidden_states

    def _patches(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """For input ``x``: a hidden state -> itself as (B, C, h, w) maps or (B, N, C) patch tokens -- the class,
        distillation and register tokens (those beyond the patch grid, in front) left out."""
        patch = getattr(getattr(self.model.config, "vision_config", self.model.config), "patch_size", None)
        ph, pw = (patch, patch) if isinstance(patch, int) else patch or (0, 0)
        grid = (x.shape[-2] // ph) * (x.shape[-1] // pw) if ph and pw else 0  # Swin's later stages hold fewer
        return lambda t: t[:, max(t.shape[1] - grid, 0):] if t.ndim == 3 and grid else t

    def survey(self, hw: tuple[int, int]) -> None:
        """One forward at input size ``hw`` (on the model's device; meta for `probe backbones --layers`: shapes
        only): ``shapes`` of the hidden states and their ``taps``, the module whose output (or input) *is* each
        one -- called once per forward and the tensor not modified in place after (its version counter), so a hook
        there sees exactly what ``output_hidden_states`` returns."""
        made: list[tuple[Tap, weakref.ref, int]] = []  # weak: the survey keeps no activation alive
        calls: Counter[str] = Counter()

        def seen(name: str, side: str, value: Any) -> None:
            if side == "out":
                calls[name] += 1
            made.extend(((name, side, k), weakref.ref(t), _version(t)) for k, t in _tensors(value))

        hooks = []
        for name, m in (self.tower.named_modules() if self.tower is not None else ()):
            hooks += [m.register_forward_pre_hook(lambda m, a, n=name: seen(n, "in", a)),
                      m.register_forward_hook(lambda m, a, o, n=name: seen(n, "out", o))]
        try:  # normal tensors even under an outer inference_mode: inference tensors count no versions
            with torch.inference_mode(False), torch.no_grad():
                x = torch.zeros(1, 3, *hw, device=next(self.model.parameters()).device)
                hidden = self._hidden_states(x)
        finally:
            for h in hooks:
                h.remove()
        patches = self._patches(x)
        self.shapes = [patches(t).shape for t in hidden]
        self.taps = [next((tap for tap, ref, v in made if ref() is t and v == _version(t) and calls[tap[0]] == 1),
                          None) for t in hidden]
        if None in self.taps:
            log.info("%s: no module makes hidden_states %s as returned, so a --layer among them is taken from "
                     "output_hidden_states (every hidden state of a batch held until pooled)",
                     type(self.model).__name__, ", ".join(str(i) for i, tap in enumerate(self.taps) if tap is None))

    def layer_names(self, hw: tuple[int, int]) -> list[str]:
        """``hidden_states.0`` (the embeddings' output) .. ``hidden_states.L`` (the last block's, before any final
        norm): the layers ``probe.backbones.at_layer`` offers, from one forward at input size ``hw`` (``survey``,
        done once: later calls reuse it)."""
        if not self.shapes:
            self.survey(hw)
        return [f"hidden_states.{i}" for i in range(len(self.shapes))]

    def layer_outputs(self, x: torch.Tensor, indices: list[int],
                      pool: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """(B, 3, H, W) -> ``pool(hidden_states[i])`` for each i of ``indices``, prefix tokens left out. Each is
        pooled by a hook where the model makes it (``taps``), so a batch holds no hidden state the model itself
        has dropped; when one has no tap, all come from ``output_hidden_states`` as made (every one held till the
        end)."""
        patches = self._patches(x)
        if any(self.taps[i] is None for i in indices):
            hidden = self._hidden_states(x)
            return [pool(patches(hidden[i])) for i in indices]
        got: dict[int, torch.Tensor] = {}
        caller = threading.get_ident()  # the hooks sit on shared modules: another thread's forward is not this one

        def take(i: int, k: int | None, value: Any) -> None:
            if threading.get_ident() == caller:
                got[i] = pool(patches(value if k is None else value[k]))

        hooks = []
        for i in indices:
            name, side, k = self.taps[i]
            m = self.tower.get_submodule(name)
            hooks.append(m.register_forward_pre_hook(lambda m, a, i=i, k=k: take(i, k, a)) if side == "in" else
                         m.register_forward_hook(lambda m, a, o, i=i, k=k: take(i, k, o)))
        try:
            self.tower(pixel_values=x, output_hidden_states=False)
        finally:
            for h in hooks:
                h.remove()
        return [got[i] for i in indices]


def _load(transformers: Any, src: str, random: bool, local_only: bool) -> tuple[nn.Module, Any, str]:
    """(model in float32, image processor, commit hash or "") from a folder or the hub/cache."""
    kw = {"local_files_only": local_only}
    config = transformers.AutoConfig.from_pretrained(src, **kw)
    extra = {"add_pooling_layer": False} if config.model_type in NO_POOLER else {}
    with torch.random.fork_rng(devices=[]):  # weights a checkpoint lacks are initialised the same way every load
        torch.manual_seed(0)
        if random:
            model = transformers.AutoModel.from_config(config, **extra)
        else:
            model, info = transformers.AutoModel.from_pretrained(src, config=config, output_loading_info=True,
                                                                 **extra, **kw)
            if info.get("missing_keys"):
                log.warning("hf/%s: the checkpoint lacks %d weights of %s (%s), initialised from seed 0: its features "
                            "are reproducible but those weights are untrained", src, len(info["missing_keys"]),
                            type(model).__name__, ", ".join(sorted(info["missing_keys"])[:4]))
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise BackboneError(f"hf/{src} has no image processor (preprocessor_config.json), so its preprocessing is "
                            f"unknown: save it beside the model, e.g. AutoImageProcessor.from_pretrained(ORIGINAL)"
                            f".save_pretrained(FOLDER) ({str(e).splitlines()[0][:160]})") from e
    return model.float(), proc, str(getattr(config, "_commit_hash", None) or "")


def hf_backbone(name: str, weights: str | None, state: dict[str, torch.Tensor] | None = None):
    """``hf/<repo id or folder>`` -> Backbone. ``weights``: None (the repo's or folder's own), ``'random'`` (its
    architecture from config.json, seeded by create_backbone), or a checkpoint file read into ``state``."""
    from .backbones import RANDOM_WEIGHTS, Backbone, WeightsUnavailableError, _local_weights, _reachable, is_offline

    transformers = import_transformers()
    src, local = source_of(name)
    if weights and weights not in RANDOM_WEIGHTS and state is None:
        raise BackboneError(f"weights {weights!r} for {name}: expected 'random' or an existing checkpoint file; the "
                            "pretrained weights are the repo's or folder's own (no --weights)")
    local_only = local or is_offline() or (not _cached(src) and not _reachable("https://huggingface.co"))
    try:
        model, proc, commit = _load(transformers, src, weights in RANDOM_WEIGHTS or state is not None, local_only)
    except OSError as e:
        if local:
            raise BackboneError(f"{name}: {src} is not a transformers model folder (config.json and weights, as "
                                f"save_pretrained writes them): {str(e).splitlines()[0][:200]}") from e
        if local_only:
            raise WeightsUnavailableError(offline_message(name, src)) from e
        raise BackboneError(f"{name}: cannot load {src} from the hub: {str(e).splitlines()[0][:200]}") from e
    ident = _local_weights(model, weights, state) or f"hf:{src}" + (f"@{commit}" if commit else "")
    tf, pre = processor_transform(proc)
    model.eval()
    with torch.inference_mode():  # one tiny forward: which output, its width, and a failure now, not mid-extraction
        x = torch.zeros(1, *pre["input_size"])
        try:
            out = model.get_image_features(pixel_values=x) if hasattr(model, "get_image_features") else model(
                pixel_values=x)
        except Exception as e:  # noqa: BLE001 - a model that does not take pixel_values: say which
            raise BackboneError(f"{name} ({type(model).__name__}) does not embed images from pixel values: "
                                f"{type(e).__name__}: {str(e)[:200]}") from e
        output = choose_output(model, out)
        features = HFFeatures(model, output)
        dim = int(features.embedding(out).shape[1])
    pre.update(output=output, transformers=transformers.__version__)
    return Backbone(PREFIX + src if local else name, features, dim, tf, pre, ident,
                    extra={"transformers": transformers.__version__, "architecture": type(model).__name__})
