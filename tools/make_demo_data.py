"""Write the embedded demo set: a few hundred real Fashion-MNIST images as an ImageFolder.

Source: Debian's ``dataset-fashion-mnist`` (MIT licence, Zalando Research), idx files under
/usr/share/datasets. Run once by a maintainer; the result is committed under probe/demo/, so
users and CI need neither this script nor the Debian package.

    apt-get install dataset-fashion-mnist && python tools/make_demo_data.py
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]  # Fashion-MNIST label order


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        idx = rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in sorted(idx):
            Image.fromarray(images[i], mode="L").save(out / name / f"{i:05d}.png", optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "probe/demo/fashion-mnist")
    ap.add_argument("--train-per-class", type=int, default=30)
    ap.add_argument("--val-per-class", type=int, default=10)
    args = ap.parse_args()
    train_x = read_idx(args.src / "train-images-idx3-ubyte.gz")
    train_y = read_idx(args.src / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(args.src / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(args.src / "t10k-labels-idx1-ubyte.gz")
    write_split(train_x, train_y, args.out / "train", args.train_per_class, seed=0)
    write_split(test_x, test_y, args.out / "val", args.val_per_class, seed=1)


if __name__ == "__main__":
    main()
