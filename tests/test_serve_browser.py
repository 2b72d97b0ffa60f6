"""The search page in a real headless browser (Debian's chromium via chromedriver), on a server with a token: open
/?token=…, upload a gallery image through the file input, wait for the result cards (thumbnails carry the token's
cookie), and read them; then a form on another origin posts to the server and is refused. A multi-label head's
labels are shown as `probe predict` gives them.

Not skipped when chromium is missing: CI installs it (.ci/run); locally `apt-get install chromium chromium-driver`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from probe.extract import extract
from probe.heads import LinearHead
from probe.heads.fit import fit_head
from probe.predict import predict
from probe.search import SearchIndex
from probe.serve.process import running_server

from .conftest import chromium, tiny_config
from .test_multilabel_heads import colour_manifest
from .test_serve_api import make_served_files
from .test_serve_security import TOKEN

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chromium-profile", window="1200,1000", page_load_timeout=60) as driver:
        yield driver


def open_page(browser, url: str):
    """Open the page with the token (as printed on start; the server keeps it in a cookie and takes it out of the
    address bar) and wait for its catalogue; the 60 s waiter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(f"{url}/?token={TOKEN}")
    assert browser.current_url == f"{url}/"
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "index")).options) > 0)
    return wait


def upload(browser, wait, image: Path) -> None:
    """Upload ``image`` through the file input and wait until the page shows its answers."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status").text
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", status


def test_page_upload_shows_nearest_images_and_predicted_class(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select

    files = make_served_files(tmp_path)
    query = sorted((files["gallery"] / "Ankle_boot").glob("*.png"))[1]
    args = ["--index", f"gallery={files['index']}", "--head", f"proto={files['head']}",
            "--state-dir", str(files["state"]), "--log-level", "warning"]
    with running_server(args, env={"PROBE_TOKEN": TOKEN}) as url:
        wait = open_page(browser, url)
        assert Select(browser.find_element(By.ID, "classifier")).first_selected_option.get_attribute("value") == \
            "head:proto"
        upload(browser, wait, query)

        cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert len(cards) == 12
        top = cards[0]
        assert top.get_attribute("data-path") == f"Ankle_boot/{query.name}"  # the image itself, it is in the gallery
        assert float(top.get_attribute("data-score")) == pytest.approx(1.0, abs=1e-4)
        assert "Ankle_boot" in top.text and "cosine 1.0000" in top.text
        scores = [float(c.get_attribute("data-score")) for c in cards]
        assert scores == sorted(scores, reverse=True)
        # thumbnails were served and decoded by the browser
        wait.until(EC.visibility_of(top.find_element(By.TAG_NAME, "img")))
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))

        preds = browser.find_elements(By.CSS_SELECTOR, "#pred-list .prediction")
        assert preds and preds[0].get_attribute("data-class") in {c.name for c in files["gallery"].iterdir()}
        assert "%" in preds[0].text
        shot = Path(os.environ.get("PROBE_SCREENSHOT", tmp_path / "page.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        # CSRF: a page on another origin (localhost is not 127.0.0.1) submits a form to the server: refused
        browser.get(f"{url.replace('127.0.0.1', 'localhost')}/?token={TOKEN}")
        browser.execute_script("""
            const f = Object.assign(document.createElement("form"),
                                    {method: "POST", action: arguments[0], enctype: "multipart/form-data"});
            f.append(Object.assign(document.createElement("input"), {name: "label", value: "pwned"}));
            document.body.append(f);
            f.submit();""", f"{url}/fewshot/csrf")
        wait.until(lambda d: d.current_url == f"{url}/fewshot/csrf")
        assert "cross-origin POST refused" in browser.find_element(By.TAG_NAME, "body").text
        assert browser.execute_script("return fetch('/fewshot').then(r => r.json())") == []


def test_page_shows_the_labels_of_a_multilabel_head(tmp_path, browser):
    """A multi-label store (red / blue colour images from a CSV manifest, as in tests/test_multilabel_heads.py) and
    its one-vs-rest linear head: the page asks for reject none and shows every label at or above its threshold, as
    `probe predict` gives them."""
    from selenium.webdriver.common.by import By

    csv = colour_manifest(tmp_path, (("train", 4), ("val", 2)))
    k = sum(1 for _ in csv.open()) - 1  # rows
    store, head, index = tmp_path / "s.h5", tmp_path / "ml.safetensors", tmp_path / "s.faiss"
    extract(csv, store, tiny_config())
    fit_head(store, LinearHead(n_Cs=8), head)
    SearchIndex.build(store).save(index)
    query = tmp_path / "imgs" / f"{k - 1}.png"  # red and blue, a val row
    want = [lab["class"] for lab in predict([query], head, top_k=2)["predictions"][0]["labels"]]
    assert sorted(want) == ["blue", "red"]  # both: the page must list more than one

    args = ["--index", f"colours={index}", "--head", f"ml={head}", "--state-dir", str(tmp_path / "state"),
            "--log-level", "warning"]
    with running_server(args, env={"PROBE_TOKEN": TOKEN}) as url:
        upload(browser, open_page(browser, url), query)  # a 422 (reject auto on a multi-label head) ends in "error"
        assert browser.find_element(By.ID, "pred-source").text == f"(head ml) — labels: {', '.join(want)}"
        preds = browser.find_elements(By.CSS_SELECTOR, "#pred-list .prediction")
        assert sorted(p.get_attribute("data-class") for p in preds) == ["blue", "red"]
        cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert len(cards) == 12 and cards[0].get_attribute("data-path") == f"imgs/{query.name}"  # the image itself
