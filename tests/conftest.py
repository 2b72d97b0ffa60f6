"""Shared fixtures: tiny generated image folders, a random-weight tiny backbone, and the real demo store.

No network: pretrained weights come only from the offline-packaged efficientnet_lite0."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probe.extract import ExtractConfig, extract

DEMO = Path(__file__).resolve().parents[1] / "probe" / "demo" / "fashion-mnist"
TINY = "timm/test_vit"  # random-weight timm test model: 64-d embeddings, 160 px input, milliseconds per batch

os.environ.setdefault("PROBE_OFFLINE", "1")  # never try a download from a test


def make_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """A small image whose colour depends on ``seed`` (so classes differ)."""
    rng = np.random.default_rng(seed)
    base = np.array([(seed * 53) % 256, (seed * 97) % 256, (seed * 193) % 256], np.uint8)
    arr = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def make_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4, splits=None) -> Path:
    """root/<class>/img_k.png, or root/<split>/<class>/… when ``splits`` is given."""
    for s in splits or [None]:
        for c, name in enumerate(classes):
            for k in range(per_class):
                folder = root / s / name if s else root / name
                make_image(folder / f"img_{k}.png", seed=c * 10 + k)
    return root


def kill_9_at(runs: dict[Path, tuple[list[str], int]], timeout: float = 120) -> None:
    """Start each ``cmd`` (an extraction into ``out``) as a child at once -- their cold starts overlap -- and kill -9
    each when its journal (``out``.journal) reaches ``nbytes``: ``runs`` maps out -> (cmd, nbytes). A child that
    exits first is left exited (the caller's "it really was interrupted" check fails then)."""
    import signal
    import subprocess
    import time

    procs = {out: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for out, (cmd, _) in runs.items()}
    deadline = time.time() + timeout
    while procs and time.time() < deadline:
        for out, proc in list(procs.items()):
            journal = Path(f"{out}.journal")
            if proc.poll() is None and not (journal.exists() and journal.stat().st_size >= runs[out][1]):
                continue
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            del procs[out]
        time.sleep(0.005)
    assert not procs, f"{len(procs)} run(s) reached no kill point in {timeout:g} s"


def tiny_config(**kw) -> ExtractConfig:
    return ExtractConfig(backbone=TINY, weights="random", batch_size=4, workers=0, dtype="float32", **kw)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """The real demo set (400 Fashion-MNIST images, train/ and val/) through the packaged lite0, once a session."""
    out = tmp_path_factory.mktemp("demo") / "demo.h5"
    extract(DEMO, out, ExtractConfig(batch_size=64, workers=2))
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A labelled split store (train/val/test, 3 classes) from the random-weight tiny backbone."""
    root = make_imagefolder(tmp_path_factory.mktemp("tiny") / "data", per_class=6, splits=("train", "val", "test"))
    out = root.parent / "tiny.h5"
    extract(root, out, tiny_config())
    return out


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(size)`` -> a fresh folder on a real tmpfs of ``size`` (e.g. "3m"): writes past it fail with
    ENOSPC, as on a full disk. Needs root (mount); skipped elsewhere. Unmounted after the test."""
    import subprocess

    mounts: list[Path] = []

    def make(size: str = "3m") -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs a tmpfs mount, which needs root")
        got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if got.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(where: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``where`` until ``leave`` bytes are free (a real file of zeros, ``where/filler``)."""
    import shutil

    free = shutil.disk_usage(where).free - leave
    filler = where / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 16)
        while free > 0:
            try:
                free -= f.write(chunk[: min(len(chunk), free)])
            except OSError:
                break
    return filler


CHROMIUM = os.environ.get("PROBE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PROBE_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run")


@contextmanager
def chromium(profile: Path, window: str, page_load_timeout: int):
    """A real headless Debian chromium driven through chromedriver (the browser tests' fixtures). Fails, never
    skips, when it is missing: CI installs it (.ci/run); locally `apt-get install chromium chromium-driver`."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium "
                    "chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in (*CHROMIUM_FLAGS, f"--window-size={window}", f"--user-data-dir={profile}"):
        opts.add_argument(f)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()


TINY_OPEN_CLIP = {"embed_dim": 16,  # an open_clip CLIP: 2-layer ViT image tower, 2-layer text tower, 16-d joint space
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def make_open_clip_dir(folder: Path, seed: int = 0) -> Path:
    """A tiny random open_clip model saved as a ``clip/local-dir:FOLDER`` backbone (open_clip_config.json and
    open_clip_model.safetensors): its config travels with it, so a child process (`probe serve`) loads it too; the
    tokenizer is open_clip's bundled one. No network."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
