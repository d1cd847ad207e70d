"""`python -m sdbatch.jobs report OUT` on real outputs: a small job on a local Ray head (a
cfg_scale x sampler sweep and a bad row), opened in headless Chromium (Debian's `chromium`,
driven by playwright without a browser download); the same OUT from S3 (moto) and synced
back; an old run without latents; and a training run of `jobs train`.

Set SDBATCH_SCREENSHOTS=1 to refresh docs/report-screenshot.png from the run report."""

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import set_env
from ray_fixtures import ray_head  # noqa: F401  (fixture)
from sdbatch.jobs import cli as jobs_cli
from sdbatch.model.weights import save_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPTS = ["a red circle", "a blue square"]
CFGS, SAMPLERS = [1.5, 7.0], ["euler", "ddim", "dpmpp_2m"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("report") / "tiny.safetensors", seed=3)


@pytest.fixture(scope="module")
def run_out(ray_head, model, tmp_path_factory):
    """OUT of a 13-row job: 2 prompts x cfg_scale {1.5, 7} x sampler {euler, ddim, dpmpp_2m},
    a carried column, and one row with a bad width."""
    folder = tmp_path_factory.mktemp("report")
    rows = [dict(prompt=p, cfg_scale=c, sampler=s, width=64, style=p.split()[1])
            for p, (c, s) in itertools.product(PROMPTS, itertools.product(CFGS, SAMPLERS))]
    rows.append(dict(prompt="a bad size", cfg_scale=7.0, sampler="euler", width=60, style="none"))
    pq.write_table(pa.Table.from_pylist(rows), folder / "prompts.parquet")
    out = folder / "out"
    rc = jobs_cli.main(["run", str(folder / "prompts.parquet"), "--model", str(model), "--output", str(out),
                        "--steps", "2", "--width", "64", "--height", "64", "--batch-size", "4", "--workers", "1"])
    assert rc == 1  # the bad row
    return out


def manifest(out: Path):
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "manifest").glob("*.parquet"))]).to_pandas()


def browse(url: str, screenshot: Path | None = None, hover: bool = False) -> dict:
    """Opens url in headless Chromium with every network request refused (the page must need
    none); returns its images, plots, console errors and, with hover, the hover thumbnail."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the report tests need Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors, outside = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r):
                if r.request.url.startswith(("file:", "data:")):
                    return r.continue_()
                outside.append(r.request.url)
                return r.abort()

            page.route("**/*", route)
            page.goto(url, wait_until="load")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            seen = dict(
                errors=errors, outside=outside,
                images=page.evaluate("Array.from(document.images).map(i => i.naturalWidth)"),
                plots=page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot'))"
                                    ".map(d => d.querySelectorAll('svg .point, svg .bars path, svg .trace path.js-line').length)"),
                links=page.evaluate("Array.from(document.querySelectorAll('a[href]:not([href^=\"#\"])'))"
                                    ".map(a => a.getAttribute('href'))"),
                text=page.inner_text("body"))
            if screenshot:  # before hovering scrolls the page (the sticky menu would be mid-page)
                page.screenshot(path=str(screenshot), full_page=True)
            if hover:  # the first point of the latent PCA plot
                point = page.locator("#latent .js-plotly-plot .scatterlayer .point").first
                point.scroll_into_view_if_needed()
                box = point.bounding_box()
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(x - 5, y - 5)
                page.mouse.move(x, y, steps=3)
                page.wait_for_function("document.getElementById('hover-thumb').style.display === 'block'",
                                       timeout=10_000)
                seen["hover_width"] = page.evaluate("document.querySelector('#hover-thumb img').naturalWidth")
            return seen
        finally:
            browser.close()


# ----------------------------------------------------------------------------- a generation run


def test_run_report_opens_offline_with_every_part(run_out, model, tmp_path, capsys):
    assert jobs_cli.main(["report", str(run_out)]) == 0
    assert "report.html" in capsys.readouterr().err
    html = (run_out / "report.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(https?:)?//", html)  # nothing fetched

    shot = tmp_path / "report.png"
    seen = browse((run_out / "report.html").as_uri(), screenshot=shot, hover=True)
    assert seen["errors"] == [] and seen["outside"] == []
    # 12 on the contact sheet + 12 in the sweep grids, all decoded
    assert len(seen["images"]) == 24 and min(seen["images"]) > 0
    assert seen["hover_width"] > 0
    assert len(seen["plots"]) == 2 and min(seen["plots"]) > 0  # histogram bars, latent points
    # the full images one click away: every link is a file of OUT, relative to it
    m = manifest(run_out)
    assert sorted(set(seen["links"])) == sorted(f"images/{i}.png" for i in m["id"])
    text = seen["text"]
    for want in ["12\nimages", "1\nerrors", "width 60 is not a positive multiple of 8", "a red circle (6 images)",
                 "Swept within a prompt: cfg_scale, sampler", "cfg_scale \\ sampler", "PCA of all 12 images",
                 "t-SNE of 12 of them", "Each image's final latent", str(model)]:
        assert want in text, want
    if os.environ.get("SDBATCH_SCREENSHOTS") == "1":
        shutil.copy(shot, REPO / "docs" / "report-screenshot.png")


def test_latent_space_traces_hold_every_image_by_prompt(run_out):
    """The latent plot's data: one PCA trace per prompt under 'prompt' (the default colouring),
    the dropdown offering the swept and carried columns, each PCA point an image's id."""
    if not (run_out / "report.html").exists():
        jobs_cli.main(["report", str(run_out)])
    html = (run_out / "report.html").read_text()
    section = html[html.index('<section id="latent">'):]
    call = re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*(\{.*\}),\s*\{\"displaylogo\"", section, re.S)
    traces, layout = json.loads(call.group(1)), json.loads(call.group(2))
    pca = [t for t in traces if t["xaxis"] == "x" and t.get("visible", True) is True]
    assert sorted(t["name"] for t in pca) == sorted(PROMPTS)
    ids = sorted(c[1] for t in pca for c in t["customdata"])
    assert ids == sorted(manifest(run_out)["id"])
    labels = [b["label"] for b in layout["updatemenus"][0]["buttons"]]
    assert labels[:3] == ["prompt", "cfg_scale", "sampler"] and "style" in labels and "seed" in labels


def test_saved_latent_is_the_images_final_latent(run_out, model):
    """OUT/latents/<id>.npy decoded by the model's VAE gives the image (float16 rounding aside),
    and not another image of the run."""
    import torch

    import sdbatch
    from sdbatch.model.pipeline import to_uint8

    sd = sdbatch.load_model(str(model), device="cpu", dtype=torch.float32)
    m = manifest(run_out)
    assert (m["latent"] == [str(run_out / "latents" / f"{i}.npy") for i in m["id"]]).all()
    decoded = []
    for uri in m["latent"][:3]:
        latent = np.load(uri, allow_pickle=False)
        assert latent.dtype == np.float16 and latent.shape == (4, 8, 8)
        with torch.inference_mode():
            decoded.append(to_uint8(sd.vae.decode(torch.from_numpy(latent[None]).float() / sd.config.latent_scale))[0])
    images = [np.asarray(Image.open(p).convert("RGB")).astype(int) for p in m["image"][:3]]
    same = [np.abs(d - im).mean() for d, im in zip(decoded, images)]
    other = [np.abs(decoded[(k + 1) % 3] - im).mean() for k, im in enumerate(images)]
    assert max(same) < 1.0 and min(other) > 10 * max(same), (same, other)


def test_report_from_s3_and_synced_back(run_out, s3_endpoint, tmp_path):
    import s3fs

    with set_env(AWS_ENDPOINT_URL=s3_endpoint):
        fs = s3fs.S3FileSystem()
        fs.mkdir("reports")
        fs.put(str(run_out) + "/", "reports/out", recursive=True)
        fs.rm("reports/out/report.html") if fs.exists("reports/out/report.html") else None
        proc = subprocess.run([sys.executable, "-m", "sdbatch.jobs", "report", "s3://reports/out"],
                              capture_output=True, text=True, env=os.environ.copy(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "s3://reports/out/report.html" in proc.stderr
        fs.get("reports/out", str(tmp_path / "synced"), recursive=True)
    seen = browse((tmp_path / "synced" / "report.html").as_uri())
    assert seen["errors"] == [] and len(seen["images"]) == 24 and min(seen["images"]) > 0
    assert seen["links"] and all((tmp_path / "synced" / link).is_file() for link in seen["links"])
    assert "s3://reports/out" in seen["text"] and "PCA of all 12 images" in seen["text"]


def test_old_run_without_latents_places_pixels_instead(run_out, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run_out, old)
    shutil.rmtree(old / "latents")
    for part in (old / "manifest").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["latent"]), part)
    assert jobs_cli.main(["report", str(old), "--tsne-sample", "5"]) == 0
    html = (old / "report.html").read_text()
    assert "This run kept no latents" in html and "16&times;16 RGB pixels" in html
    assert "t-SNE of 5 of them" in html and html.count("data:image/jpeg;base64,") >= 24


def test_rows_without_an_image_are_counted_not_shown(run_out, tmp_path):
    """A row the safety checker flagged is recorded with nsfw true and no image or latent."""
    flagged = tmp_path / "flagged"
    shutil.copytree(run_out, flagged)
    for part in (flagged / "manifest").glob("*.parquet"):
        t = pq.read_table(part).to_pandas()
        first = t["id"] == "00000000"
        t.loc[first, ["image", "latent"]] = None
        t["nsfw"] = first
        pq.write_table(pa.Table.from_pandas(t, preserve_index=False), part)
    (flagged / "images" / "00000000.png").unlink()
    assert jobs_cli.main(["report", str(flagged)]) == 0
    html = (flagged / "report.html").read_text()
    assert "flagged by the safety checker" in html and "PCA of all 11 images" in html
    assert "images/00000000.png" not in html and html.count('href="images/') == 11 + 11


def test_a_bigger_run_is_sampled_and_says_so(run_out, tmp_path):
    assert jobs_cli.main(["report", str(run_out), "--sample", "7", "--tsne-sample", "4"]) == 0
    html = (run_out / "report.html").read_text()
    assert "a random sample of 7 of the 12 images" in html and "t-SNE of 4 of them" in html


def test_folder_that_is_no_run_is_refused(tmp_path, capsys):
    assert jobs_cli.main(["report", str(tmp_path)]) == 2
    assert "has neither run.json nor train.json" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()



def test_run_where_every_row_failed_still_gets_its_report(model, tmp_path):
    """The run a user most needs the error list of: nothing generated, nothing started on Ray."""
    pq.write_table(pa.table({"prompt": ["a red circle", None], "width": [60, 64]}), tmp_path / "bad.parquet")
    out = tmp_path / "out"
    assert jobs_cli.main(["run", str(tmp_path / "bad.parquet"), "--model", str(model), "--output", str(out)]) == 1
    assert jobs_cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "width 60 is not a positive multiple of 8" in page and "prompt is null" in page
    errors = page[page.index('<table class="errors">'):]
    errors = errors[:errors.index("</table>")]
    assert "<td>nan</td>" not in errors and "<td>None</td>" not in errors  # the null prompt shows empty

# ----------------------------------------------------------------------------- a training run


def test_training_report(ray_head, tmp_path):
    data, prompts = tmp_path / "shapes.parquet", tmp_path / "prompts.txt"
    assert subprocess.run([sys.executable, "-m", "sdbatch.data", "shapes", str(data), "--rows", "8", "--quiet"],
                          timeout=300).returncode == 0
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "train"
    assert jobs_cli.main(["train", str(data), "--output", str(out), "--config", "tiny", "--steps", "4",
                          "--checkpoint-every", "2", "--resolution", "32", "--batch-size", "2", "--grad-accum", "1",
                          "--validation-prompts", str(prompts)]) == 0
    assert jobs_cli.main(["report", str(out)]) == 0
    seen = browse((out / "report.html").as_uri())
    assert seen["errors"] == [] and seen["outside"] == []
    steps = sorted(p.name for p in (out / "samples").glob("step-*.png"))
    assert steps == ["step-000002.png", "step-000004.png"]
    # the validation grids, then 8 rows of the data; the loss plot drawn
    assert len(seen["images"]) == 2 + 8 and min(seen["images"]) > 0
    assert sorted(seen["links"]) == [f"samples/{s}" for s in steps]
    assert len(seen["plots"]) == 1 and seen["plots"][0] > 0
    for want in ["Training run", "step 2", "step 4", "a red circle · a blue square", "steps of 4", str(data)]:
        assert want in seen["text"], want
