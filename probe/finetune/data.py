"""Training data for fine-tuning: the train/val split of DATA, augmentation presets and the image loader.

Validation is DATA's ``val`` split when it has one, else a seeded stratified holdout of train. Inputs with
``in_chans`` other than 3 are read as arrays: ``.tif``/``.tiff`` (ImageFolder or CSV) and ``.npy`` (CSV
manifest: folders only list image extensions), shaped (H, W, C) or (C, H, W); grey images for 1 channel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from ..data import Dataset, DatasetError, ImageDecodeError, load_image
from .model import channel_stats

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ splitting
def _holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from ..heads import stratified_holdout  # the same sampler the heads use: one definition of "holdout"

    return stratified_holdout(y, fraction, seed)


def train_val_indices(ds: Dataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, val rows, where val came from) of a labelled dataset; test rows are left out."""
    labelled = ds.labels >= 0
    if not labelled.any():
        raise DatasetError(f"{ds.root} has no labels: fine-tuning needs class folders, a split root "
                           f"(train/<class>/…) or a CSV manifest with a label column")
    splits = np.array(ds.splits)
    if len(set(ds.labels[labelled].tolist())) < 2:
        raise DatasetError(f"{ds.root} has {len(ds.classes)} class ({', '.join(ds.classes)}): a classifier needs "
                           f"at least 2")
    if (splits[labelled] == "val").any():
        val = np.flatnonzero(labelled & (splits == "val"))
        train = np.flatnonzero(labelled & np.isin(splits, ["train", ""]))
        source = "val split"
    else:
        pool = np.flatnonzero(labelled & np.isin(splits, ["train", ""]))
        tr, va = _holdout(ds.labels[pool], val_fraction, seed)
        train, val = pool[tr], pool[va]
        source = f"{val_fraction:.0%} stratified holdout of train (seed {seed})"
    if (splits[labelled] == "test").any():
        log.info("%d test images left out of fine-tuning (evaluate them with the best checkpoint)",
                 int((splits == "test").sum()))
    if not len(train) or not len(val):
        raise DatasetError(f"{ds.root}: {len(train)} training and {len(val)} validation images: fine-tuning needs "
                           f"both (give each class at least 2 training images, or a val/ split)")
    return train, val, source


# ----------------------------------------------------------------------------------------- transforms
def _interpolation(pre: dict[str, Any]) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(str(pre.get("interpolation", "bilinear")).lower())
    except ValueError:
        return T.InterpolationMode.BILINEAR


def _resize_size(pre: dict[str, Any]) -> int:
    if pre.get("resize"):
        return int(pre["resize"][0])
    return int(round(pre["crop"] / float(pre.get("crop_pct", 1.0))))


def train_transform(augment: str, pre: dict[str, Any], eval_tf: Any, in_chans: int = 3) -> Any:
    """The preset's training transform, with the backbone's crop, interpolation, mean and std.

    seeds: RandomResizedCrop + RandomHorizontalFlip + ColorJitter(0.2, 0.2, 0.2); randaugment: RandomResizedCrop
    + flip + RandAugment (torchvision, 2 ops at magnitude 9); none: the evaluation transform."""
    if augment == "none":
        return eval_tf if in_chans == 3 else eval_transform(pre, in_chans)
    crop, interp = int(pre["crop"]), _interpolation(pre)
    if in_chans != 3:  # arrays as (C, H, W) tensors: geometric augmentation only, colour ops assume RGB
        if augment == "randaugment":
            log.info("--augment randaugment on %d-channel input: crop and flip only (its colour ops need RGB)",
                     in_chans)
        return T.Compose([T.RandomResizedCrop(crop, interpolation=interp, antialias=True), T.RandomHorizontalFlip(),
                          T.Normalize(channel_stats(pre["mean"], in_chans), channel_stats(pre["std"], in_chans))])
    ops = [T.RandomResizedCrop(crop, interpolation=interp), T.RandomHorizontalFlip()]
    ops += [T.ColorJitter(0.2, 0.2, 0.2)] if augment == "seeds" else [T.RandAugment(interpolation=interp)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])


def eval_transform(pre: dict[str, Any], in_chans: int = 3) -> Any:
    """For arrays with in_chans channels: resize, centre crop, normalise (the backbone's own for RGB)."""
    return T.Compose([T.Resize(_resize_size(pre), interpolation=_interpolation(pre), antialias=True),
                      T.CenterCrop(int(pre["crop"])),
                      T.Normalize(channel_stats(pre["mean"], in_chans), channel_stats(pre["std"], in_chans))])


# ------------------------------------------------------------------------------------------- loading
def load_array(path: str, in_chans: int) -> torch.Tensor:
    """A file with ``in_chans`` channels -> (C, H, W) float32 in [0, 1] (integers scaled by their range)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            a = tifffile.imread(path)
        elif in_chans == 1:
            a = np.asarray(load_image(path).convert("L"))
        else:
            a = np.asarray(load_image(path))
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable array is skipped with its reason
        raise ImageDecodeError(f"cannot read array: {type(e).__name__}: {e}") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 3 and a.shape[-1] != in_chans and a.shape[0] == in_chans:
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim != 3 or a.shape[-1] != in_chans:
        raise ImageDecodeError(f"array of shape {a.shape}: expected (H, W, {in_chans}) or ({in_chans}, H, W) "
                               f"for --in-chans {in_chans}")
    scale = float(np.iinfo(a.dtype).max) if np.issubdtype(a.dtype, np.integer) else 1.0
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32) / scale)


class Images(torch.utils.data.Dataset):
    """(x, label, row) per file; a file that does not decode gives (None, label, reason), never an exception."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: Any, in_chans: int = 3):
        self.paths, self.labels, self.transform, self.in_chans = paths, labels, transform, in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.paths[i]) if self.in_chans == 3 else load_array(self.paths[i], self.in_chans)
            return self.transform(img), int(self.labels[i]), ""
        except ImageDecodeError as e:
            return None, i, str(e)
        except Exception as e:  # noqa: BLE001 - a transform failing on an odd image must not stop training
            return None, i, f"preprocessing failed: {type(e).__name__}: {e}"


def collate(items):
    """-> x (B, C, H, W), y (B,), [(row, reason)] of the files that failed."""
    ok = [(x, y) for x, y, why in items if x is not None]
    bad = [(i, why) for x, i, why in items if x is None]
    if not ok:
        return None, None, bad
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok]), bad
