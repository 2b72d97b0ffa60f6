"""Images whose *resized* size exhausts memory (issue 13): a 12000x1 PNG is 12,000 pixels, far under any source limit,
and a shortest-side resize makes it 2016000x168 (tiny backbone) or 3072000x256 (lite0) before the crop. Such images
are refused from their header -- in extract (a skip reason), predict and search (a one-line error) and the service
(413) -- and the real server's peak memory stays flat under concurrent uploads of them.

Real files throughout: Pillow-made strips of a few hundred bytes, the random-weight tiny backbone."""

from __future__ import annotations

import functools
import io
import itertools
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from probe.data import MAX_PIXELS, ResizeTooLarge, decode
from probe.extract import extract
from probe.gpu_decode import read_jpeg
from probe.heads.fit import fit_head
from probe.search import SearchIndex
from probe.serve.process import ServerProcess
from probe.store import FeatureStore
from probe.transforms import Footprint, resized_size

from .conftest import TINY, make_image, tiny_config

runner = CliRunner()
STRIPS = {"wide": (12000, 1), "huge": (1_000_000, 1), "tall": (1, 50000)}  # all refused by the tiny backbone
ACCEPTED_STRIP = (300, 2)  # resized to 25200x168 = 4.2 Mpx: extreme, but within every default limit


def strip(path: Path, size: tuple[int, int], fmt: str = "PNG") -> Path:
    """A one-colour image of ``size``: a few hundred bytes to a few KB whatever its width."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format=fmt)
    return path


def strip_bytes(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format=fmt)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def tiny_backbone():
    from probe.backbones import create_backbone

    return create_backbone(TINY, "random")


def one_error_line(r) -> str:
    """The CLI's answer to a user error: exit 1 and one line, `error: …` (no traceback, no warnings before it)."""
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


# ------------------------------------------------------------------------------------------- the rule
def test_resized_size_is_torchvision_rule():
    from torchvision.transforms.functional import _compute_resized_output_size as torchvision_rule

    shapes = [(12000, 1), (1, 50000), (640, 480), (3, 7), (1_000_000, 1), (256, 256), (255, 257)]
    for (w, h), size, max_size in itertools.product(shapes, [256, [168], [224, 200], None], [None, 1000]):
        if (size is None and max_size is None) or (max_size and isinstance(size, list) and len(size) == 2):
            continue
        want_h, want_w = torchvision_rule((h, w), [size] if isinstance(size, int) else size, max_size,
                                          allow_size_none=True)
        assert resized_size(w, h, size, max_size) == (want_w, want_h), (w, h, size, max_size)


@pytest.mark.parametrize("mode", ["center", "border", "squash"])
def test_footprint_is_what_the_transform_makes(mode):
    """The footprint covers every image the PIL transform really makes (timm's ResizeKeepRatio, CenterCropOrPad,
    torchvision's Resize), and adds no more than the one-axis pass of a resize (within the widest x tallest box)."""
    from timm.data import create_transform

    tf = create_transform(input_size=(3, 64, 48), crop_mode=mode, crop_pct=0.9, is_training=False)
    fp = Footprint.of(tf)
    assert fp.steps, tf
    for size in [(300, 20), (20, 300), (64, 48), (33, 91), (5000, 90)]:
        x, made = Image.new("RGB", size), []
        for t in tf.transforms[:-2]:  # up to MaybeToTensor, Normalize
            x = t(x)
            made.append(x.size)
        fw, fh = fp(*size)
        box = max(w for w, _ in [size, *made]) * max(h for _, h in [size, *made])
        assert max(w * h for w, h in made) <= fw * fh <= box, (mode, size, made, (fw, fh))


def test_refused_from_the_header_before_any_pixel_is_decoded(tmp_path):
    fp = Footprint.of(tiny_backbone().pixels)
    data = strip_bytes((12000, 1))
    with pytest.raises(ResizeTooLarge, match=r"12000x1 pixels would be resized to 2016000x168 = 338688000 pixels .*"
                                             r"limit of 89478485: an aspect ratio of 12000:1 is too extreme"):
        decode(io.BytesIO(data[: len(data) // 2]), footprint=fp)  # truncated: decoding it would fail otherwise
    img = decode(io.BytesIO(strip_bytes(ACCEPTED_STRIP)), footprint=fp)
    assert img.size == ACCEPTED_STRIP and fp(*ACCEPTED_STRIP) == (25200, 168)
    jpeg = strip(tmp_path / "wide.jpg", (20000, 2), "JPEG")
    with pytest.raises(ResizeTooLarge):
        decode(jpeg, draft=2 * 168, footprint=fp)
    assert read_jpeg(str(jpeg), MAX_PIXELS) is not None  # the GPU reader's header check: to nvjpeg without a bound
    assert read_jpeg(str(jpeg), MAX_PIXELS, fp) is None  # with it, to the CPU path, which refuses it with the reason


# --------------------------------------------------------------------------------------------- extract
def test_extract_skips_them_with_a_reason_and_completes(tmp_path):
    data = tmp_path / "data"
    for k in range(3):
        make_image(data / "ok" / f"img_{k}.png", seed=k)
    for name, size in STRIPS.items():
        strip(data / "ok" / f"{name}.png", size)
    strip(data / "ok" / "wide.jpg", (20000, 2), "JPEG")
    strip(data / "ok" / "narrow.png", ACCEPTED_STRIP)
    out = tmp_path / "s.h5"
    summary = extract(data, out, tiny_config())
    store = FeatureStore(out)
    skipped = {Path(s["path"]).name: s["reason"] for s in store.skipped()}
    assert sorted(skipped) == ["huge.png", "tall.png", "wide.jpg", "wide.png"], skipped
    assert {Path(s["path"]).name for s in summary.skipped} == set(skipped)
    assert "12000x1 pixels would be resized to 2016000x168" in skipped["wide.png"]
    assert "1x50000 pixels would be resized to 168x8400000" in skipped["tall.png"]
    assert all("too extreme to embed" in r for r in skipped.values())
    assert sorted(Path(p).name for p in store.paths()) == ["img_0.png", "img_1.png", "img_2.png", "narrow.png"]


def test_extract_max_pixels_flag_lowers_the_limit(tmp_path):
    data = tmp_path / "data"
    make_image(data / "ok" / "small.png", seed=0)  # 32x32 at most
    strip(data / "ok" / "wide.png", (200, 10))
    out = tmp_path / "s.h5"
    r = runner.invoke(app, ["extract", str(data), "--out", str(out), "--backbone", TINY, "--weights", "random",
                            "--workers", "0", "--max-pixels", "100000", "--json"])
    assert r.exit_code == 0, r.output
    skipped = {Path(s["path"]).name: s["reason"] for s in FeatureStore(out).skipped()}
    assert list(skipped) == ["wide.png"], skipped  # resized to 3360x168 for the backbone
    r = runner.invoke(app, ["extract", str(data), "--out", str(out), "--backbone", TINY, "--weights", "random",
                            "--workers", "0", "--json"])  # the default limit: the skipped file is tried again
    assert r.exit_code == 0 and json.loads(r.stdout)["embedded"] == 1, r.output
    store = FeatureStore(out)
    assert store.skipped() == [] and sorted(Path(p).name for p in store.paths()) == ["small.png", "wide.png"]


# ------------------------------------------------------------------------------------- predict, search
@pytest.fixture(scope="module")
def head_and_index(tiny_store, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("faults")
    fit_head(tiny_store, "prototype", out / "proto.safetensors")
    SearchIndex.build(tiny_store).save(out / "gallery.faiss")
    return out / "proto.safetensors", out / "gallery.faiss"


def test_predict_refuses_them_in_one_line(head_and_index, tmp_path):
    head, _ = head_and_index
    huge = strip(tmp_path / "huge.png", STRIPS["huge"])
    line = one_error_line(runner.invoke(app, ["predict", str(huge), "--head", str(head)]))
    assert line.startswith("error: none of the 1 images could be embedded: ") and str(huge) in line, line
    assert "1000000x1 pixels would be resized to 168000000x168" in line and "too extreme" in line, line

    good = make_image(tmp_path / "good.png", seed=3)
    wide = strip(tmp_path / "wide.png", STRIPS["wide"])
    r = runner.invoke(app, ["predict", str(good), str(wide), "--head", str(head), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [p["path"] for p in out["predictions"]] == [str(good)]
    assert [s["path"] for s in out["skipped"]] == [str(wide)] and "too extreme" in out["skipped"][0]["reason"]


def test_predict_on_nothing_decodable_is_an_error(head_and_index, tmp_path):
    head, _ = head_and_index
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    line = one_error_line(runner.invoke(app, ["predict", str(broken), str(empty), "--head", str(head)]))
    assert "none of the 2 images could be embedded" in line and "not an image" in line and "empty file" in line


def test_search_by_image_refuses_them_in_one_line(head_and_index, tmp_path):
    _, index = head_and_index
    tall = strip(tmp_path / "tall.png", STRIPS["tall"])
    line = one_error_line(runner.invoke(app, ["search", str(tall), "--index", str(index), "-k", "3"]))
    assert "no query could be used" in line and "1x50000 pixels would be resized to 168x8400000" in line, line


# ---------------------------------------------------------------------------------------------- service
def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a process so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


RSS_BOUND_MB = 150  # measured: +0 to 2 MB with the fix; without it, one 12000x1 upload alone is +1 GB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(["--backbone", TINY, "--weights", "random", "--engine", "torch", "--log-level", "warning",
                         "--state-dir", str(tmp_path_factory.mktemp("state"))])  # default --max-pixels 40,000,000
    srv.start()
    yield srv
    srv.close()


def test_service_answers_413_never_500(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, size in [*STRIPS.items(), ("jpeg", (20000, 2))]:
            fmt = "JPEG" if name == "jpeg" else "PNG"
            r = c.post("/embed", files={"file": (f"{name}.{fmt.lower()}", strip_bytes(size, fmt), "image/png")})
            assert r.status_code == 413, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert f"the image is {size[0]}x{size[1]} pixels" in detail and "--max-pixels" in detail, detail
            assert "too extreme to embed" in detail, detail
        r = c.post("/embed", files={"file": ("narrow.png", strip_bytes(ACCEPTED_STRIP), "image/png")})
        assert r.status_code == 200 and len(r.json()["embedding"]) == 64, r.text
    assert "Traceback" not in server.output()


def test_service_memory_stays_flat_under_concurrent_adversarial_uploads(server):
    pid = server.proc.pid
    with httpx.Client(base_url=server.url, timeout=60) as c:  # warm: a real image through decode and forward
        assert c.post("/embed", files={"file": ("ok.png", strip_bytes((64, 48)), "image/png")}).status_code == 200
    before = vm_hwm_mb(pid)
    uploads = [strip_bytes(s) for s in [*STRIPS.values(), (30000, 1), (1, 12000)]] * 2
    uploads = uploads[:8]
    statuses: list[int] = []
    barrier = threading.Barrier(len(uploads))

    def send(data: bytes) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            barrier.wait()
            statuses.append(c.post("/embed", files={"file": ("x.png", data, "image/png")}).status_code)

    threads = [threading.Thread(target=send, args=(d,)) for d in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grew = vm_hwm_mb(pid) - before
    print(f"server peak RSS {before:.0f} MB -> +{grew:.1f} MB under {len(uploads)} concurrent adversarial uploads")
    assert statuses == [413] * len(uploads), statuses
    assert grew < RSS_BOUND_MB, f"peak RSS grew by {grew:.0f} MB (bound {RSS_BOUND_MB} MB)"


def test_embed_images_refuses_an_in_memory_strip():
    from probe.embedder import Embedder
    from probe.errors import ProbeError

    emb = Embedder(tiny_backbone(), device="cpu", dtype="float32", engine="torch")
    assert emb.footprint(12000, 1)[0] * emb.footprint(12000, 1)[1] > MAX_PIXELS
    with pytest.raises(ProbeError, match="image 1: 12000x1 pixels would be resized"):
        emb.embed_images([Image.new("RGB", (32, 32)), Image.new("RGB", (12000, 1))])
    assert emb.embed_images([Image.new("RGB", ACCEPTED_STRIP)]).shape == (1, 64)
    assert np.isfinite(emb.embed_images([Image.new("RGB", ACCEPTED_STRIP)])).all()
