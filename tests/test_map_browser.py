"""The `probe map` page in a real headless browser (Debian's chromium via chromedriver), opened as a file:// page:
the canvas holds every point, the legend every class; the real mouse hovers a point (tooltip with its path and a
decoded thumbnail, embedded or loaded from the image file), the wheel zooms, a drag pans, a legend click hides a
class; and a 50k-point page loads within a generous bound.

Not skipped when chromium is missing: CI installs it (.ci/run); locally `apt-get install chromium chromium-driver`.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from probe.embedding_map import embedding_map
from probe.store import FeatureStore, store_from_arrays

from .conftest import chromium

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chromium-profile", window="1200,900", page_load_timeout=120) as driver:
        yield driver


def open_map(browser, path, timeout: float = 60) -> float:
    """Open the page and wait until its script has drawn; returns the seconds it took."""
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    browser.get(path.absolute().as_uri())
    WebDriverWait(browser, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") == "ready")
    return time.perf_counter() - t0


def screen_points(browser) -> np.ndarray:
    """(N, 2) every row's position on the canvas, CSS pixels from its top-left corner."""
    return np.array(browser.execute_script(
        "return Array.from({length: probeMap.n}, (_, i) => probeMap.screenXY(i))"))


def hover(browser, canvas, xy) -> None:
    """Move the real mouse to canvas position xy (selenium's offsets are from the element's centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    w, h = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]",
                                  canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, round(xy[0] - w / 2), round(xy[1] - h / 2)).perform()


def isolated(xy: np.ndarray, rows, size, gap: float = 12.0) -> int:
    """A row among ``rows`` on screen whose nearest other point is at least ``gap`` px away."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    inside = (xy > 20).all(1) & (xy < np.array(size) - 20).all(1)
    ok = [i for i in rows if inside[i] and d[i].min() >= gap]
    assert ok, "no isolated point to hover"
    return ok[0]


def test_demo_map_hover_zoom_pan_and_legend(demo_store, tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store = FeatureStore(demo_store)
    m = embedding_map(store, method="pca", out=tmp_path / "map.html", thumbs=200, seed=0)  # half embedded
    open_map(browser, m.out)
    wait = WebDriverWait(browser, 30)
    canvas = browser.find_element(By.ID, "map")
    assert canvas.get_attribute("data-points") == "400" and canvas.get_attribute("data-drawn") == "400"
    items = browser.find_elements(By.CSS_SELECTOR, "#legend .item[data-cat]")
    assert [i.get_attribute("data-name") for i in items] == store.classes
    assert [i.get_attribute("data-count") for i in items] == ["40"] * 10

    xy = screen_points(browser)
    size = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]",
                                  canvas)
    paths = store.paths()
    tip = browser.find_element(By.ID, "tooltip")
    embedded = {int(k) for k in browser.execute_script(
        "return Object.keys(JSON.parse(document.getElementById('map-data').textContent).thumbs)")}
    assert len(embedded) == 200
    for kind, rows in (("embedded", sorted(embedded)), ("file", sorted(set(range(400)) - embedded))):
        row = isolated(xy, rows, size)
        hover(browser, canvas, xy[row])
        wait.until(lambda d, row=row: tip.is_displayed() and tip.get_attribute("data-row") == str(row))
        assert paths[row] in tip.text and f"label: {store.classes[store.labels()[row]]}" in tip.text
        assert tip.get_attribute("data-thumb") == kind  # "file": loaded from file://<store root>/<path>
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#tooltip img'); return !!i && i.complete && i.naturalWidth > 0"))
        assert browser.execute_script("return probeMap.hovered()") == row

    before = browser.execute_script("return probeMap.view()")
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -300).perform()  # wheel up
    wait.until(lambda d: d.execute_script("return probeMap.view().scale") > before["scale"] * 1.2)
    zoomed = browser.execute_script("return probeMap.view()")
    assert zoomed["tx"] != before["tx"]  # about the cursor, not the corner
    ActionChains(browser).move_to_element_with_offset(canvas, -100, -100).click_and_hold() \
        .move_by_offset(80, 40).release().perform()
    wait.until(lambda d: d.execute_script("return probeMap.view().tx") != zoomed["tx"])
    panned = browser.execute_script("return probeMap.view()")
    assert panned["tx"] - zoomed["tx"] == pytest.approx(80, abs=2)
    assert panned["ty"] - zoomed["ty"] == pytest.approx(40, abs=2) and panned["scale"] == zoomed["scale"]

    browser.execute_script("probeMap.reset()")
    items[0].click()  # hide the first class
    wait.until(lambda d: canvas.get_attribute("data-drawn") == "360")
    assert "off" in items[0].get_attribute("class")
    items[0].click()
    wait.until(lambda d: canvas.get_attribute("data-drawn") == "400")


def test_50k_point_page_loads_and_hovers(tmp_path, browser, record_property):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    n, classes, rng = 50_000, 20, np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(classes, 64))[y] * 2 + rng.normal(size=(n, 64))  # (n, 64) 20 clusters
    paths = [f"class{c:02d}/img_{i:06d}.jpg" for i, c in enumerate(y)]  # files that do not exist
    store = store_from_arrays(tmp_path / "big.h5", X, y, paths=paths, classes=[f"class{c:02d}" for c in
                                                                              range(classes)],
                              splits=["train"] * n, root=str(tmp_path / "nowhere"))
    t0 = time.perf_counter()
    m = embedding_map(store, method="pca", out=tmp_path / "big.html")
    build = time.perf_counter() - t0
    assert m.thumbnails == 0 and m.bytes == (tmp_path / "big.html").stat().st_size

    load = open_map(browser, m.out, timeout=120)
    canvas = browser.find_element(By.ID, "map")
    assert canvas.get_attribute("data-points") == "50000" and canvas.get_attribute("data-drawn") == "50000"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#legend .item[data-cat]")) == classes
    paint_ms = browser.execute_script("return probeMap.paintMs()")
    record_property("map_50k", {"bytes": m.bytes, "build_s": round(build, 2), "load_s": round(load, 2),
                                "paint_ms": round(paint_ms, 1)})
    print(f"\n50k-point map: {m.bytes / 2**20:.1f} MiB, built in {build:.1f}s, loaded in {load:.1f}s, "
          f"one redraw {paint_ms:.0f} ms")
    assert load < 60  # generous: ~2 s on a 2-core CPU

    xy = screen_points(browser)
    target = xy[12345]
    hover(browser, canvas, target)
    tip = browser.find_element(By.ID, "tooltip")
    WebDriverWait(browser, 30).until(lambda d: tip.is_displayed() and tip.get_attribute("data-row"))
    row = int(tip.get_attribute("data-row"))
    assert np.linalg.norm(xy[row] - target) <= 2.0  # the grid index found the point under the mouse
    assert paths[row] in tip.text and tip.get_attribute("data-thumb") == "file"
    WebDriverWait(browser, 30).until(lambda d: "image not available here" in tip.text)  # the file is not there
