"""The web page at `/`, in headless Chromium (Debian's `chromium`, driven by playwright-python
with `executable_path`: no browser download): fill the form, generate, and check the image that
appears equals the API's image for the same seed, byte for byte with its PNG metadata; a blocked
prompt shows the API's 422 message, a flagged image is not shown; browse a job's output folder. A screenshot of each view is kept (tests/screenshots/ with
SDBATCH_KEEP_SCREENSHOTS=1, else the test's tmp folder)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import sdbatch
from sdbatch.a1111 import a1111_parameters, encode_png

from serve_fixtures import FLAGGED, served  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
SCREENSHOTS = Path(__file__).parent / "screenshots"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    # ERR_ABORTED: the page itself closing a stream it is done with (Gradio's queue events)
    page.on("requestfailed", lambda req: None if "ERR_ABORTED" in (req.failure or "") else
            errors.append(f"{req.url}: {req.failure}"))
    page.goto(served.url + "/", wait_until="networkidle")
    page.wait_for_selector("#generate", timeout=60_000)
    yield page
    assert not errors, errors  # no script errors, no request left unanswered (no CDN, no Google Fonts)
    page.close()


def _screenshot(page, name: str, tmp_path: Path) -> Path:
    folder = SCREENSHOTS if os.environ.get("SDBATCH_KEEP_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _set(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input[type=text]").first
    box.fill(str(value))
    box.press("Tab")


def test_generate_in_the_page_equals_the_api(page, served, tmp_path):  # noqa: F811
    form = dict(prompt="a red cube on a table", negative="blurry", seed=4242, steps=12, cfg=6.5, width=64, height=64)
    for elem_id, value in form.items():
        _set(page, elem_id, value)
    page.click("#generate")
    # the progress indicator shows while the request runs
    page.wait_for_selector("#gallery .progress-text, #gallery .eta-bar, #gallery .meta-text", timeout=60_000)
    page.wait_for_selector("#gallery img", timeout=120_000)
    page.wait_for_selector("#files a", timeout=60_000)
    _screenshot(page, "serve_page_generate.png", tmp_path)

    api = requests.post(f"{served.url}/sdapi/v1/txt2img", timeout=120, json=dict(
        prompt=form["prompt"], negative_prompt="blurry", seed=4242, steps=12, cfg_scale=6.5, width=64, height=64,
        sampler_name="DPM++ 2M", scheduler="Automatic")).json()
    api_png = base64.b64decode(api["images"][0])

    shown = page.locator("#gallery img").first.get_attribute("src")
    shown_png = requests.get(shown if shown.startswith("http") else served.url + shown, timeout=60).content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown_png)).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(api_png)).convert("RGB")))
    download = page.locator("#files a").first.get_attribute("href")
    download_png = requests.get(download if download.startswith("http") else served.url + download, timeout=60).content
    assert download_png == api_png  # the download is the API's PNG, parameters chunk and all
    row = dict(prompt=form["prompt"], negative_prompt="blurry", seed=4242, steps=12, sampler="dpmpp_2m_karras",
               cfg_scale=6.5, width=64, height=64)
    assert Image.open(io.BytesIO(download_png)).info["parameters"] == a1111_parameters(row, served.model.hash)
    assert "Seed: 4242" in page.locator("#parameters textarea").input_value()


def test_blocked_prompt_shows_the_apis_message(page, served, tmp_path):  # noqa: F811
    _set(page, "prompt", "a red car at night")
    _set(page, "width", 64)
    _set(page, "height", 64)
    page.click("#generate")
    message = page.get_by_text("matches blocklist rule 'red car'")
    message.first.wait_for(timeout=60_000)
    assert f"prompt: the prompt matches blocklist rule 'red car' ({served.blocklist}, line 2): nothing generated" \
        in message.first.inner_text()
    assert page.locator("#gallery img").count() == 0
    _screenshot(page, "serve_page_blocked.png", tmp_path)


def test_flagged_image_is_not_shown(page, served, tmp_path):  # noqa: F811
    f = FLAGGED
    for elem_id, value in dict(prompt=f["prompt"], seed=f["seed"], steps=f["steps"], cfg=7, width=f["size"],
                               height=f["size"], batch=2).items():
        _set(page, elem_id, value)
    page.locator("#sampler input").first.click()
    page.get_by_role("option", name="Euler", exact=True).click()
    page.click("#generate")
    page.get_by_text("1 of 2 images flagged by the safety checker: not shown").first.wait_for(timeout=120_000)
    page.wait_for_selector("#gallery img", timeout=60_000)
    assert page.locator("#gallery .thumbnail-item img, #gallery .preview img").count() >= 1
    texts = page.locator("#parameters textarea").input_value()
    assert f"Seed {f['seed']}: flagged by the safety checker, not shown" in texts
    assert f"Seed: {f['seed'] + 1}," in texts
    download = page.locator("#files a")
    assert download.count() == 1 and download.first.get_attribute("href").endswith(f"-{f['seed'] + 1}.png")
    _screenshot(page, "serve_page_flagged.png", tmp_path)


def _job_folder(served, folder: Path) -> Path:  # noqa: F811
    """A `jobs run` output folder in its real layout, written with the job's own writers."""
    import pyarrow as pa

    from sdbatch.jobs.output import Output
    from sdbatch.jobs.record import manifest_schema

    out = Output(str(folder))
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    images = sdbatch.generate(served.model, prompts, seeds=[1, 2, 3], steps=2, width=64, height=64,
                              sampler="euler", cfg_scale=7.0, progress=False)
    rows = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        row = dict(id=f"{i:08d}", prompt=prompt, negative_prompt="", seed=i + 1, steps=2, cfg_scale=7.0,
                   sampler="euler", width=64, height=64, init_image=None, strength=0.8)
        path = out.path("images", f"{row['id']}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_bytes(encode_png(image, a1111_parameters(row, served.model.hash)))
        rows.append(dict(row, image=path, sha256="", model_hash=served.model.hash, seconds=0.1, worker="w"))
    out.write_part("manifest", pa.Table.from_pylist(rows, schema=manifest_schema()))
    out.write_part("errors", pa.Table.from_pylist([dict(id="00000003", error="Row 3 (id '00000003'): prompt is empty.",
                                                        row=3, prompt="")]))
    return folder


def test_browse_a_job_folder(page, served, tmp_path):  # noqa: F811
    folder = _job_folder(served, tmp_path / "run1")
    page.get_by_role("tab", name="Browse a job").click()
    _set(page, "job", folder)
    page.click("#show")
    page.wait_for_function("document.querySelectorAll('#thumbs img').length === 3", timeout=60_000)
    assert "3 images, 1 errors" in page.locator("#summary").inner_text()
    assert "prompt is empty" in page.locator("#errors").inner_text()
    assert "a blue sphere" in page.locator("#thumbs").inner_text()
    column = page.locator("#column input").first
    column.fill("prompt")
    column.press("Enter")
    _set(page, "filter", "SPHERE")
    page.click("#show")
    page.wait_for_function("document.querySelectorAll('#thumbs img').length === 1", timeout=60_000)
    assert "1 match" in page.locator("#summary").inner_text()
    _screenshot(page, "serve_page_browse.png", tmp_path)
