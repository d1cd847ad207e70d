"""The web page at `/` (Gradio, mounted on the ingress's FastAPI app; Gradio serves its own
scripts, styles and fonts, so the page works offline).

- Generate: prompt, negative prompt, seed, steps, guidance, sampler + scheduler, size, batch
  size, an optional init image with its strength; a progress bar while it runs; the images with
  their parameters; PNG downloads that keep the `parameters` chunk (and the safeguards' marks).
  A prompt the blocklist refuses shows the API's 422 message; images the safety checker flags
  are not shown (a warning says how many).
- Browse a job: a `jobs run` output folder (local path or URI): thumbnails with their prompts,
  filtered by any manifest column, and the errors listed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import tempfile
from typing import Any

from sdbatch.serve.a1111_api import SAMPLERS, SCHEDULERS, Img2ImgRequest, RequestError, Txt2ImgRequest

MAX_THUMBNAILS = 120
THUMBNAIL_PX = 192


def read_job(uri: str):
    """(manifest, errors) of a `jobs run` output folder as pandas DataFrames (either may be empty).
    Raises ValueError when the folder holds neither."""
    import pandas as pd

    from sdbatch.jobs.output import Output

    out = Output(uri.strip())
    tables = {}
    for folder in ("manifest", "errors"):
        table = out.read(folder)
        tables[folder] = pd.DataFrame() if table is None else table.to_pandas()
    if tables["manifest"].empty and tables["errors"].empty:
        raise ValueError(f"{uri}: no manifest/ or errors/ Parquet parts (not the output of `sdbatch.jobs run`?)")
    if not tables["manifest"].empty:
        tables["manifest"] = tables["manifest"].sort_values("id", ignore_index=True)
    return tables["manifest"], tables["errors"]


def filter_rows(table, column: str | None, text: str):
    """Rows whose `column`, as text, contains `text` (case-insensitive); all rows without a filter."""
    if not column or not text or table.empty:
        return table
    return table[table[column].astype(str).str.contains(text, case=False, regex=False)]


def thumbnails(table, limit: int = MAX_THUMBNAILS) -> list[tuple[Any, str]]:
    """[(PIL thumbnail, "id: prompt")] of the first `limit` rows, read from their `image` URIs."""
    from PIL import Image

    from sdbatch import storage

    out = []
    for row in table.head(limit).itertuples():
        fs, path = storage.url_to_fs(row.image)
        with Image.open(io.BytesIO(storage.read_bytes(fs, path))) as im:
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            out.append((im.convert("RGB"), f"{row.id}: {row.prompt}"))
    return out


def _png_to_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_page(ingress):
    """The Gradio Blocks; its events call `ingress.run` and `ingress.progress` (sdbatch.serve.app.Ingress)."""
    import gradio as gr

    outputs_dir = tempfile.mkdtemp(prefix="sdbatch-page-")

    async def generate(prompt, negative, seed, steps, cfg_scale, sampler, scheduler, width, height, batch_size,
                       init_image, strength, progress=gr.Progress()):
        import pydantic

        # The form's values go through the API's request models and checks, as a client's would.
        fields = dict(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, cfg_scale=cfg_scale,
                      sampler_name=sampler, scheduler=scheduler, width=width, height=height, batch_size=batch_size)
        try:
            req = (Txt2ImgRequest(**fields) if init_image is None else
                   Img2ImgRequest(**fields, init_images=[_png_to_b64(init_image)], denoising_strength=strength))
        except pydantic.ValidationError as exc:
            raise gr.Error(str(exc)) from None
        task = asyncio.ensure_future(ingress.run(req))
        progress(0, desc="queued")
        while not task.done():
            state = await ingress.progress()
            if state["state"]["sampling_steps"]:
                progress(state["progress"], desc=f"step {state['state']['sampling_step']}"
                                                 f"/{state['state']['sampling_steps']}")
            await asyncio.wait([task], timeout=0.25)
        try:
            result = task.result()
        except RequestError as exc:
            raise gr.Error(str(exc)) from None
        import json

        info = json.loads(result["info"])
        kept = [i for i, flagged in enumerate(info["nsfw"]) if not flagged]  # the API leaves flagged ones out
        paths = []
        for i, data in zip(kept, result["images"]):
            path = os.path.join(outputs_dir, f"{info['job_timestamp']}-{info['all_seeds'][i]}.png")
            with open(path, "wb") as f:
                f.write(base64.b64decode(data))
            paths.append(path)
        gallery = [(p, info["infotexts"][i]) for p, i in zip(paths, kept)]
        texts = [info["infotexts"][i] if i in kept else
                 f"Seed {seed}: flagged by the safety checker, not shown" for i, seed in enumerate(info["all_seeds"])]
        if len(kept) < len(info["nsfw"]):
            gr.Warning(f"{len(info['nsfw']) - len(kept)} of {len(info['nsfw'])} images flagged by the safety "
                       "checker: not shown")
        return gallery, "\n\n".join(texts), paths

    def browse(uri, column, text):
        try:
            manifest, errors = read_job(uri)
        except (ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        shown = filter_rows(manifest, column, text)
        summary = (f"{len(manifest)} images, {len(errors)} errors; {len(shown)} match"
                   + (f", showing the first {MAX_THUMBNAILS}" if len(shown) > MAX_THUMBNAILS else ""))
        columns = list(manifest.columns)
        error_view = errors[[c for c in ("id", "error", "row", "prompt") if c in errors.columns]]
        return (gr.Dropdown(choices=columns, value=column if column in columns else None), thumbnails(shown),
                summary, error_view)

    with gr.Blocks(title="sdbatch", analytics_enabled=False) as page:
        gr.Markdown("## sdbatch: text to image")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                        steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                        cfg_scale = gr.Slider(1, 30, value=7, step=0.5, label="Guidance (CFG scale)",
                                              elem_id="cfg")
                    with gr.Row():
                        sampler = gr.Dropdown(list(SAMPLERS), value="DPM++ 2M", label="Sampler", elem_id="sampler")
                        scheduler = gr.Dropdown([label for label in SCHEDULERS.values()], value="Automatic",
                                                label="Schedule type", elem_id="scheduler")
                    with gr.Row():
                        width = gr.Slider(64, 1024, value=512, step=8, label="Width", elem_id="width")
                        height = gr.Slider(64, 1024, value=512, step=8, label="Height", elem_id="height")
                        batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="batch")
                    with gr.Accordion("Image to image", open=False):
                        init_image = gr.Image(label="Init image (optional)", type="pil", elem_id="init")
                        strength = gr.Slider(0.05, 1, value=0.75, step=0.05, label="Denoising strength",
                                             elem_id="strength")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", format="png", columns=2, height=420, object_fit="contain",
                                         elem_id="gallery")
                    parameters = gr.Textbox(label="Parameters", lines=4, elem_id="parameters")
                    files = gr.File(label="Download (PNG with parameters)", file_count="multiple", elem_id="files")
            run.click(generate, [prompt, negative, seed, steps, cfg_scale, sampler, scheduler, width, height,
                                 batch_size, init_image, strength], [gallery, parameters, files])
        with gr.Tab("Browse a job"):
            with gr.Row():
                uri = gr.Textbox(label="Job output folder (path or URI, as given to jobs run --output)",
                                 elem_id="job", scale=3)
                column = gr.Dropdown([], label="Filter column", allow_custom_value=True, elem_id="column")
                text = gr.Textbox(label="contains", elem_id="filter")
                open_job = gr.Button("Show", elem_id="show")
            summary = gr.Markdown(elem_id="summary")
            thumbs = gr.Gallery(label="Images", columns=6, preview=False, object_fit="contain", elem_id="thumbs")
            errors = gr.Dataframe(label="Errors", elem_id="errors")
            open_job.click(browse, [uri, column, text], [column, thumbs, summary, errors])
    page.sdbatch_outputs = outputs_dir
    return page


def mount_page(app, page):
    """Mount the page at `/` of the FastAPI app (after its /sdapi routes, which keep precedence).
    System fonts only: the default theme would ask Google Fonts, which an offline browser lacks."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, page, path="/", ssr_mode=False, theme=theme,
                               allowed_paths=[page.sdbatch_outputs], footer_links=[])
