"""The service's parts without a server: the micro-batcher, upload decoding, few-shot persistence, start-up checks."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from probe.backbones import BackboneError
from probe.extract import extract
from probe.serve.batching import MicroBatcher
from probe.serve.errors import BadImage, Conflict, NotAnImage, NotFound, ServiceError, TooLarge
from probe.serve.fewshot_sets import FewShotSets
from probe.serve.images import decode_upload
from probe.serve.service import ServeConfig, load_service, parse_named

from .conftest import make_imagefolder, tiny_config


# ------------------------------------------------------------------------------------------- micro-batching
def run(coro):
    return asyncio.run(coro)


def test_concurrent_submissions_share_batches_and_keep_their_order():
    calls: list[int] = []

    def fn(xs):
        calls.append(len(xs))
        time.sleep(0.02)  # a forward pass: meanwhile more requests queue up
        return [x * 10 for x in xs]

    async def main():
        b = MicroBatcher(fn, max_batch=8, max_wait_ms=5)
        await b.start()
        out = await asyncio.gather(*[b.submit(i) for i in range(20)])
        await b.stop()
        return out, b.stats.as_dict()

    out, stats = run(main())
    assert out == [i * 10 for i in range(20)]
    assert max(calls) <= 8 and sum(calls) == 20 and len(calls) < 20
    assert stats["requests"] == 20 and stats["mean_batch"] > 1


def test_max_batch_one_means_one_forward_per_request():
    calls: list[int] = []

    async def main():
        b = MicroBatcher(lambda xs: calls.append(len(xs)) or xs, max_batch=1, max_wait_ms=5)
        await b.start()
        await asyncio.gather(*[b.submit(i) for i in range(5)])
        await b.stop()

    run(main())
    assert calls == [1] * 5


def test_a_lone_request_waits_at_most_max_wait():
    async def main():
        b = MicroBatcher(lambda xs: xs, max_batch=32, max_wait_ms=20)
        await b.start()
        t = time.perf_counter()
        await b.submit(1)
        dt = time.perf_counter() - t
        await b.stop()
        return dt

    assert run(main()) < 0.5


def test_a_failing_batch_fails_its_requests_not_the_worker():
    async def main():
        def fn(xs):
            if "bad" in xs:
                raise RuntimeError("boom")
            return xs

        b = MicroBatcher(fn, max_batch=4, max_wait_ms=5)
        await b.start()
        first = await asyncio.gather(b.submit("bad"), b.submit("x"), return_exceptions=True)
        after = await b.submit("ok")
        alive = b.running
        stats = b.stats.as_dict()
        await b.stop()
        return first, after, alive, stats

    first, after, alive, stats = run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert after == "ok" and alive and stats["failed_batches"] == 1


def test_batcher_refuses_bad_settings_and_submissions_before_start():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda xs: xs, max_batch=0)
    with pytest.raises(RuntimeError, match="not running"):
        run(MicroBatcher(lambda xs: xs).submit(1))


# ------------------------------------------------------------------------------------------------- uploads
def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_upload_converts_like_the_extractor():
    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))  # fully transparent -> white
    assert decode_upload(_encode(rgba), 10**6).getpixel((0, 0)) == (255, 255, 255)
    assert decode_upload(_encode(Image.new("L", (5, 5), 7)), 10**6).mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: width and height swap when turned upright
    rotated = decode_upload(_encode(Image.new("RGB", (20, 10)), "JPEG", exif=exif), 10**6)
    assert rotated.size == (10, 20)


@pytest.mark.parametrize("data, error, words", [
    (b"", BadImage, "empty"),
    (b"%PDF-1.4 not an image", NotAnImage, "not an image"),
    (_encode(Image.new("RGB", (64, 64)))[:60], BadImage, "truncated"),
    (_encode(Image.new("RGB", (2000, 1000))), TooLarge, "2000x1000 = 2000000 pixels"),
])
def test_decode_upload_refuses_with_reasons(data, error, words):
    with pytest.raises(error, match=words):
        decode_upload(data, max_pixels=10**6)


def test_errors_carry_http_statuses():
    assert [e.status for e in (ServiceError, NotFound, Conflict, TooLarge, NotAnImage, BadImage)] == \
        [422, 404, 409, 413, 415, 422]


# ------------------------------------------------------------------------------------------- few-shot sets
def test_fewshot_sets_persist_and_refuse_other_backbones(tmp_path):
    rng = np.random.default_rng(0)
    sets = FewShotSets(tmp_path, config_key="k1", backbone="bb", dim=4)
    sets.create("pets")
    with pytest.raises(Conflict, match="exists already"):
        sets.create("pets")
    with pytest.raises(ServiceError, match="no examples"):
        sets.classify("pets", rng.normal(size=4))
    for label, centre in (("cat", 5.0), ("dog", -5.0)):
        for _ in range(3):
            sets.add("pets", label, centre + rng.normal(size=4), source="x.png")
    with pytest.raises(ServiceError, match="invalid label"):
        sets.add("pets", "  ", np.zeros(4))
    with pytest.raises(ServiceError, match="invalid set name"):
        sets.create("../etc")
    before = sets.classify("pets", np.full(4, 4.0), top_k=2)
    assert before["top"][0]["class"] == "cat"

    again = FewShotSets(tmp_path, config_key="k1", backbone="bb", dim=4)  # a restarted server
    assert again.get("pets").summary()["classes"] == {"cat": 3, "dog": 3}
    assert again.classify("pets", np.full(4, 4.0), top_k=2) == before
    with np.load(tmp_path / "fewshot" / "pets.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["features"].shape == (6, 4) and z["labels"].tolist().count("dog") == 3

    other = FewShotSets(tmp_path, config_key="k2", backbone="other", dim=4)
    assert other.list()[0]["usable"] is False
    with pytest.raises(Conflict, match="not comparable"):
        other.classify("pets", np.zeros(4))
    with pytest.raises(NotFound, match="available sets: pets"):
        other.get("nope")
    assert again.delete("pets")["deleted"] and not (tmp_path / "fewshot" / "pets.npz").exists()


# --------------------------------------------------------------------------------------------- start-up
def test_parse_named():
    named = parse_named(["a=x/h.safetensors", "y/idx.faiss"], "head")
    assert {k: str(v) for k, v in named.items()} == {"a": "x/h.safetensors", "idx": "y/idx.faiss"}
    with pytest.raises(ValueError, match="two heads are named 'h'"):
        parse_named(["x/h.safetensors", "y/h.safetensors"], "head")
    with pytest.raises(ValueError, match="--max-batch"):
        ServeConfig(max_batch=0)


def test_refuses_to_mix_backbone_configurations(tmp_path):
    data = make_imagefolder(tmp_path / "d", per_class=1)
    plain, hflip = tmp_path / "plain.h5", tmp_path / "hflip.h5"
    extract(data, plain, tiny_config())
    extract(data, hflip, tiny_config(tta="hflip"))  # same backbone and weights, another configuration
    with pytest.raises(BackboneError, match=f"store {hflip} was made with backbone timm/test_vit"):
        load_service(ServeConfig(stores=(str(plain), str(hflip)), state_dir=str(tmp_path / "s")))
    result = CliRunner().invoke(_cli(), ["serve", "--store", str(plain), "--store", f"b={hflip}",
                                         "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 1 and "one server serves one backbone" in result.output


def test_cli_reports_missing_files_without_binding(tmp_path):
    result = CliRunner().invoke(_cli(), ["serve", "--head", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 1 and "nope.safetensors" in result.output and "does not exist" in result.output


def _cli():
    from cli.main import app

    return app
