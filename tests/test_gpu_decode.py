"""GPU decode, the parts that run on the CPU: which files the workers hand to nvjpeg, EXIF orientation, the
resize/crop function (the same calls run on CUDA tensors), and the whole GPU reader with torchvision's CPU decoder
standing in for nvjpeg -- same rows and skip reasons as the CPU reader. tests/test_cuda.py runs it on a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from probe import gpu_decode
from probe.data import MAX_PIXELS, load_image
from probe.errors import ProbeError
from probe.extract import ExtractConfig, _collate, _Files, extract
from probe.gpu_decode import GpuReader, ahead, choose_decode, decode_jpegs, orient, read_jpeg, resize_crop
from probe.store import FeatureStore
from probe.transforms import PixelTransform

from .conftest import tiny_config
from .test_extract import make_bad_corpus

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision >= 0.29: its decoders


def photos() -> list[np.ndarray]:
    import skimage.data

    return [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()]


def save_photos(root: Path, n: int = 8) -> list[Path]:
    """n 500x375 JPEGs (some other sizes, some mirrored) of real photos, in two classes."""
    out = []
    for k in range(n):
        img = Image.fromarray(photos()[k % 4])
        size = (500, 375) if k % 3 else (480, 360)  # two decoded sizes in a batch: both resize groups
        img = img.resize(size)
        if k % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        path = root / ("a" if k % 2 else "b") / f"photo_{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        out.append(path)
    return out


def transforms() -> list[PixelTransform]:
    """torchvision's (bilinear, antialiased, ImageClassification preset) and timm's (bicubic) eval transforms."""
    from timm.data import create_transform
    from torchvision.models import ResNet50_Weights

    tfs = [ResNet50_Weights.DEFAULT.transforms(), create_transform(input_size=224, interpolation="bicubic",
                                                                   crop_pct=0.875)]
    return [PixelTransform.from_transform(tf) for tf in tfs]


def as_bytes(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


# ------------------------------------------------------------------------------------- what goes to nvjpeg
def test_workers_hand_nvjpeg_only_plain_rgb_jpegs(tmp_path):
    expect = make_bad_corpus(tmp_path)  # PNG, CMYK JPEG, truncated JPEG, text named .jpg, links, a bomb …
    d = tmp_path / "things"
    photo = save_photos(tmp_path / "photos", 1)[0]
    grey = d / "grey.jpg"
    Image.fromarray(photos()[0]).convert("L").save(grey)
    padded = d / "padded.jpg"
    padded.write_bytes(photo.read_bytes() + b"\x00" * 16)  # zero padding after the end marker: still a JPEG
    trailing = d / "trailing.jpg"
    trailing.write_bytes(photo.read_bytes() + b"more data")  # the CPU path decides
    got = read_jpeg(str(photo), MAX_PIXELS)
    assert got is not None and got[0] == photo.read_bytes() and got[1] == 1
    assert read_jpeg(str(padded), MAX_PIXELS) is not None
    rotated = read_jpeg(str(d / "rotated.jpg"), MAX_PIXELS)
    assert rotated is not None and rotated[1] == 6  # EXIF orientation read from the header
    for name in [*expect, "grey.jpg", "trailing.jpg"]:
        if name != "rotated.jpg":
            assert read_jpeg(str(d / name), MAX_PIXELS) is None, name
    assert read_jpeg(str(photo), 480 * 360 - 1) is None  # over max_pixels: the CPU path refuses it with its reason
    assert read_jpeg(str(d / "nothing-here.jpg"), MAX_PIXELS) is None


def test_orientation_matches_pil_exif_transpose(tmp_path):
    yy, xx = np.mgrid[0:40, 0:60]
    smooth = np.dstack([xx * 4, yy * 6, np.full_like(xx, 90)]).astype(np.uint8)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        path = tmp_path / f"o{o}.jpg"
        Image.fromarray(smooth).save(path, exif=exif, quality=95)
        data, orientation = read_jpeg(str(path), MAX_PIXELS)
        x = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], "cpu")[0]
        got = orient(x, orientation).permute(1, 2, 0).numpy()
        want = np.asarray(load_image(str(path)))
        assert got.shape == want.shape, o
        assert np.abs(got.astype(int) - want).max() <= 1, o  # same libjpeg here: the same pixels
    x = torch.arange(6).reshape(1, 2, 3)
    assert torch.equal(orient(x, 0), x) and torch.equal(orient(x, 9), x)  # unknown values: as stored


def test_one_bad_stream_does_not_fail_the_batch(tmp_path):
    good = save_photos(tmp_path, 2)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"), dtype=torch.uint8)
    out = decode_jpegs([as_bytes(good[0]), bad, as_bytes(good[1])], "cpu")
    assert out[1] is None and out[0].shape == (3, 360, 480) and out[2].shape == (3, 375, 500)
    assert decode_jpegs([bad], "cpu") == [None] and decode_jpegs([], "cpu") == []


# ----------------------------------------------------------------------------------------- resize + crop
@pytest.mark.parametrize("contiguous", [False, True], ids=["hwc-memory", "planar"])
def test_resize_crop_equals_the_cpu_pixel_transform(contiguous):
    """Mixed sizes in one call (grouped by size, then put back in order) give PixelTransform's pixels: on the CPU
    the same uint8 kernels, whether the (3, H, W) tensors are views of HWC memory (PIL) or planar (nvjpeg)."""
    imgs = [Image.fromarray(a) for a in photos()] + [Image.fromarray(photos()[1]).resize((500, 375)),
                                                     Image.fromarray(photos()[0][::-1].copy())]  # sizes 2, 1, 1 …
    for pt in transforms():
        want = torch.stack([pt(im) for im in imgs])
        chw = [PixelTransform.chw(im) for im in imgs]
        got = resize_crop([x.contiguous() for x in chw] if contiguous else chw, pt.steps)
        assert got.shape == want.shape == (len(imgs), 224, 224, 3) and got.is_contiguous()
        assert (got.int() - want.int()).abs().max() <= 1, pt
        one = resize_crop([chw[0], chw[0]], pt.steps)  # one size: the ungrouped path
        assert torch.equal(one[0], one[1]) and (one[0].int() - want[0].int()).abs().max() <= 1


# ------------------------------------------------------------------------------------- the whole reader
def _cpu_batches(paths, pt, batches):
    files = _Files(paths, pt, MAX_PIXELS, draft=pt.draft)
    return [_collate([files[i] for i in b]) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_reader_gives_the_cpu_readers_rows_and_reasons(tmp_path, workers):
    """torchvision's CPU decoder stands in for nvjpeg: the same batches (rows, order, skip reasons) as the CPU
    reader, JPEG, PNG, CMYK, EXIF-rotated, truncated and non-image files mixed in one batch."""
    expect = make_bad_corpus(tmp_path)
    save_photos(tmp_path / "things", 6)
    paths = sorted(str(p) for p in (tmp_path / "things").rglob("*") if p.is_file() or p.is_symlink())
    paths = [p for p in paths if not p.endswith("bomb.png")]  # 96 Mpx: a test of its own, in test_extract
    pt = transforms()[1]
    batches = [list(range(0, len(paths), 2)), list(range(1, len(paths), 2))]
    want = _cpu_batches(paths, pt, batches)
    got = list(GpuReader(paths, pt, "cpu", MAX_PIXELS, pt.draft, batches, workers))  # decoded a batch ahead
    inline = list(GpuReader(paths, pt, "cpu", MAX_PIXELS, pt.draft, batches, workers, prefetch=0))
    assert len(got) == len(want) == len(inline) == 2
    assert all(g.indices == i.indices and torch.equal(g.images, i.images) for g, i in zip(got, inline))
    for g, w in zip(got, want):
        assert g.indices == w.indices and g.failed == w.failed and g.views is None
        assert g.images.shape == w.images.shape and g.images.dtype == torch.uint8
        assert (g.images.int() - w.images.int()).abs().max() <= 1
    reasons = {Path(paths[i]).name: r for b in got for i, r in b.failed}
    assert {n for n, w in expect.items() if w not in ("ok", "decompression bomb")} == set(reasons)


def test_a_jpeg_nvjpeg_refuses_takes_the_cpu_path(tmp_path, monkeypatch):
    """A file the worker let through that the device's decoder refuses: decoded on the CPU if it can be, else
    skipped with the CPU path's reason."""
    paths = [str(p) for p in save_photos(tmp_path, 3)]
    fake = tmp_path / "a" / "fake.jpg"
    fake.write_bytes(Path(paths[0]).read_bytes()[:200] + b"\xff\xd9")  # a header, no scan: PIL says truncated
    paths.append(str(fake))
    pt = transforms()[0]
    real = gpu_decode.decode_jpegs

    def refuse_first(jpegs, device):
        out = real(jpegs, device)
        return [None, *out[1:]]

    monkeypatch.setattr(gpu_decode, "decode_jpegs", refuse_first)
    batches = [[3, 0, 1, 2]]
    want = _cpu_batches(paths, pt, batches)[0]
    got = next(iter(GpuReader(paths, pt, "cpu", MAX_PIXELS, pt.draft, batches, 0)))
    assert got.indices == want.indices == [0, 1, 2]  # 3 failed: read_jpeg let it through, then the CPU path
    assert got.failed == want.failed and "truncated" in got.failed[0][1]
    assert (got.images.int() - want.images.int()).abs().max() <= 1


# --------------------------------------------------------------------------------------------- selecting
def test_decode_option_is_checked_before_any_model_loads():
    assert ExtractConfig().decode == "auto"
    with pytest.raises(ProbeError, match="unknown decode"):
        ExtractConfig(decode="nvjpeg")
    with pytest.raises(ProbeError, match="--pixels uint8"):
        ExtractConfig(decode="gpu", pixels="pil")
    with pytest.raises(ProbeError, match="augmented views"):
        ExtractConfig(decode="gpu", views=2)
    if not torch.cuda.is_available():
        with pytest.raises(ProbeError, match="CUDA"):
            ExtractConfig(decode="gpu")
    with pytest.raises(ProbeError, match="CUDA"):
        ExtractConfig(decode="gpu", device="cpu")
    ExtractConfig(decode="cpu", device="cpu")


def test_auto_picks_gpu_only_on_cuda_with_uint8_pixels_and_no_views(monkeypatch):
    pt = transforms()[0]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(gpu_decode, "nvjpeg_available", lambda device: True)
    assert choose_decode("auto", cpu, pt, 0) == "cpu"
    assert choose_decode("auto", cuda, pt, 0) == "gpu"
    assert choose_decode("auto", cuda, None, 0) == "cpu"  # the PIL path
    assert choose_decode("auto", cuda, pt, 2) == "cpu"  # views are made on the CPU
    assert choose_decode("cpu", cuda, pt, 0) == "cpu"
    assert choose_decode("gpu", cuda, pt, 0) == "gpu"
    with pytest.raises(Exception, match="no uint8 form"):
        choose_decode("gpu", cuda, None, 0)
    monkeypatch.setattr(gpu_decode, "nvjpeg_available", lambda device: False)  # torchvision without nvjpeg
    assert choose_decode("auto", cuda, pt, 0) == "cpu"
    with pytest.raises(ProbeError, match="nvjpeg"):
        choose_decode("gpu", cuda, pt, 0)


def test_nvjpeg_probe_decodes_a_tiny_jpeg():
    assert gpu_decode.nvjpeg_available("cpu")  # the probe itself works; on CUDA it is what auto consults


def test_extract_through_the_gpu_reader_matches_the_cpu_reader(tmp_path, monkeypatch):
    """The selection in extract's reader, end to end on the CPU: forced to the GPU reader, a mixed folder gives
    the same rows, skip reasons and features as the CPU reader."""
    root = tmp_path / "data"
    make_bad_corpus(root)
    save_photos(root / "photos", 6)
    (root / "things" / "bomb.png").unlink()
    cpu = extract(root, tmp_path / "cpu.h5", tiny_config())
    chosen = []
    monkeypatch.setattr(gpu_decode, "choose_decode", lambda *a: chosen.append(a) or "gpu")
    gpu = extract(root, tmp_path / "gpu.h5", tiny_config())
    assert chosen and chosen[0][0] == "auto"
    assert gpu["skipped"] == cpu["skipped"] and gpu["count"] == cpu["count"]
    a, b = FeatureStore(cpu["store"]), FeatureStore(gpu["store"])
    assert list(a.paths()) == list(b.paths())
    fa, fb = a.features(), b.features()
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() >= 0.999


def test_cli_decode_flag(tmp_path):
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--decode", "gpu", "--device", "cpu"])
    assert res.exit_code == 1 and "--decode gpu needs a CUDA device" in res.output
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--decode", "sideways"])
    assert res.exit_code == 1 and "unknown decode" in res.output


def test_encoded_bytes_survive_the_collate():
    """Workers concatenate a batch's JPEGs into one tensor (one shared-memory block, not one per file)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    items = [("jpeg", (buf.getvalue(), 6), 4, ""), ("bad", None, 5, "empty file (0 bytes)"),
             ("jpeg", (buf.getvalue() + b"\x00", 1), 7, "")]
    enc = gpu_decode._collate_encoded(items)
    parts = torch.split(enc.data, enc.sizes)
    assert bytes(parts[0].numpy()) == buf.getvalue() and bytes(parts[1].numpy()) == buf.getvalue() + b"\x00"
    assert enc.orientation == [6, 1] and enc.jpeg_indices == [4, 7] and enc.order == [4, 5, 7]
    assert enc.failed == [(5, "empty file (0 bytes)")] and enc.pixels is None


def test_ahead_keeps_order_raises_and_stops_early():
    """The decode thread: results in order, at most ``depth`` ahead, its exception raised in the consumer, and
    a consumer that stops early ends it."""
    import threading

    seen = []

    def slow_square(x):
        seen.append(x)
        return x * x

    assert list(ahead(range(20), slow_square, 2, torch.device("cpu"))) == [x * x for x in range(20)]
    gen = ahead(range(1000), slow_square, 2, torch.device("cpu"))
    seen.clear()
    assert next(gen) == 0
    gen.close()  # the consumer stops: the thread ends without computing the rest
    assert len(seen) <= 5 and not any(t.name == "probe-gpu-decode" for t in threading.enumerate())

    def boom(x):
        if x == 3:
            raise RuntimeError("nvjpeg broke")
        return x

    got = []
    with pytest.raises(RuntimeError, match="nvjpeg broke"):
        for x in ahead(range(10), boom, 2, torch.device("cpu")):
            got.append(x)
    assert got == [0, 1, 2]
