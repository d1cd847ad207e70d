"""The run report: one self-contained HTML page of what a job made.

    python -m sdbatch.jobs report OUT [--sample N] [--tsne-sample N] [--seed S]

Writes OUT/report.html for the output of `jobs run` (run.json) or `jobs train` (train.json). The
page needs nothing but itself: plotly's JavaScript is inline and every thumbnail is a data URI,
so it opens offline wherever it is copied; the links to the full images are relative to OUT, so
they work when OUT is browsed or synced as a whole.

A run's report: the summary (model, settings, counts, errors, time, images/s), a contact sheet
grouped by prompt, grids over the swept settings, the per-image time histogram, metrics.json,
and the latent space: PCA of the final latents (OUT/latents/, kept by the job) of up to --sample
images and t-SNE of up to --tsne-sample of those, coloured by any manifest column, with the
thumbnail on hover. A bigger run is sampled (the page says so), so a 1M-image run's report takes
minutes: it reads the whole manifest, but only the sampled images and latents. A run made before
the job kept latents gets the same plots of the images' 16x16 pixels instead, and says so.

A training run's report: the settings, the loss curve, the validation grids over steps and a
sample of the training data.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import posixpath
import sys
from typing import Any

import numpy as np

from sdbatch import storage
from sdbatch.errors import JobError
from sdbatch.jobs.output import Output

THUMB_PX = 128          # longest side of a thumbnail
HOVER_PX = 80           # ... of one shown only on hovering the latent plot (up to --sample of them)
FEATURE_GRID = 16       # latents (and old runs' images) are averaged to C x 16 x 16 features
MAX_CATEGORIES = 20     # a colour column shows its 19 commonest values and "other"
SWEEP_MAX_VALUES = 12   # a setting with more distinct values is not drawn as a grid axis
SWEEP_COLUMNS = ("cfg_scale", "sampler", "steps", "strength", "width", "height", "negative_prompt")
FILE_COLUMNS = ("id", "image", "latent", "sha256", "model_hash", "init_image", "nsfw")


# ----------------------------------------------------------------------------- images and files


def data_uri(image, px: int = THUMB_PX) -> str:
    """A PIL image as a JPEG data URI, scaled (never enlarged) to `px` on its longest side."""
    from PIL import Image

    im = image.convert("RGB")
    im.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def relative(out: Output, uris, folder: str):
    """The URIs (a pandas Series, as the manifest records them) as paths relative to OUT; a file
    recorded elsewhere (OUT was moved or copied) is looked for under OUT/folder by its name."""
    prefix = storage.to_uri(out.fs, out.root) + "/"
    inside = uris.str.startswith(prefix)
    return uris.str.slice(len(prefix)).where(inside, folder + "/" + uris.str.rsplit("/", n=1).str[-1])


def fetch(out: Output, names: list[str]) -> dict[str, bytes]:
    """The files at these OUT-relative names that exist, read concurrently where the
    filesystem can (s3fs fetches a list of paths at once)."""
    paths = {out.path(n): n for n in dict.fromkeys(names)}
    order, got = list(paths), {}
    chunk = 512
    for i in range(0, len(order), chunk):
        res = storage.retry(out.fs.cat, order[i:i + chunk], on_error="return")
        got.update({paths[p]: v for p, v in res.items() if p in paths and isinstance(v, bytes)})
        if len(order) > chunk:
            print(f"report: read {min(i + chunk, len(order))}/{len(order)} files", file=sys.stderr)
    return got


def open_image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def thumbnail(data: bytes | None, px: int = THUMB_PX) -> str | None:
    """A data URI thumbnail of an image file; None for a missing or unreadable one (the page
    shows it as missing and goes on)."""
    if data is None:
        return None
    try:
        return data_uri(open_image(data), px)
    except Exception:  # a truncated or foreign file
        return None


# ----------------------------------------------------------------------------- a generation run


def read_parts(out: Output, folder: str):
    """OUT/folder's Parquet parts as one DataFrame (None when there are none)."""
    table = out.read(folder)
    return None if table is None else table.to_pandas()


def label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def varying_columns(manifest) -> list[str]:
    """Manifest columns worth colouring by: prompt first, then the swept settings, then the rest
    that take at least two values (file names, hashes and ids left out)."""
    cols = [c for c in manifest.columns if c not in FILE_COLUMNS and manifest[c].astype(str).nunique() > 1]
    order = ["prompt", *SWEEP_COLUMNS]
    return sorted(cols, key=lambda c: order.index(c) if c in order else len(order))


def swept_columns(manifest, carried: list[str]) -> list[str]:
    """Settings that vary within a prompt with at most SWEEP_MAX_VALUES values: grid axes."""
    swept = []
    for c in [*SWEEP_COLUMNS, *carried]:
        if c in manifest.columns and 1 < manifest[c].astype(str).nunique() <= SWEEP_MAX_VALUES:
            if manifest[["prompt", c]].astype(str).drop_duplicates().groupby("prompt").size().max() > 1:
                swept.append(c)
    return swept


def sample_rows(manifest, n: int, seed: int):
    """All rows when there are at most n, else n of them at random (reproducibly)."""
    if len(manifest) <= n:
        return manifest
    return manifest.sample(n=n, random_state=seed).sort_index()


def latent_features(latents: list[np.ndarray]) -> np.ndarray:
    """(N, C*16*16) float32: each (C, h, w) array averaged over a 16x16 grid (adaptive average
    pooling), so latents of any size compare."""
    import torch
    import torch.nn.functional as F

    return np.stack([F.adaptive_avg_pool2d(torch.from_numpy(a.astype(np.float32)), FEATURE_GRID).flatten().numpy()
                     for a in latents])


def embed(features: np.ndarray, tsne_n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PCA 2-D of every row, indices of the t-SNE sample, its t-SNE 2-D).

    scikit-learn's PCA; t-SNE (van der Maaten & Hinton 2008) on the first 50 principal
    components, as its documentation recommends for many dimensions, perplexity
    min(30, (n-1)/3) so that small runs work."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(features)
    pca = PCA(n_components=min(2, n, features.shape[1])).fit_transform(features)
    pca = np.pad(pca, ((0, 0), (0, 2 - pca.shape[1])))
    if n < 4:
        return pca, np.arange(0), np.zeros((0, 2))
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(tsne_n, n), replace=False))
    reduced = PCA(n_components=min(50, len(pick), features.shape[1]), random_state=seed).fit_transform(features[pick])
    tsne = TSNE(n_components=2, perplexity=min(30.0, (len(pick) - 1) / 3), init="pca",
                random_state=seed).fit_transform(reduced)
    return pca, pick, tsne


def colour_traces(fig, xy: np.ndarray, rows, col: str, subplot: int, show_legend: bool) -> int:
    """Adds one scatter trace per value of `col` (numbers with many values: one trace with a
    colour bar) to subplot (1, subplot); returns how many. customdata = (row index in the page's
    thumbnail list, id)."""
    import plotly.graph_objects as go

    values = rows[col]
    numeric = values.dtype.kind in "if" and values.nunique() > MAX_CATEGORIES
    hover = "%{customdata[1]}<br>" + col + ": %{text}<extra></extra>"
    custom = np.stack([rows["_thumb"].to_numpy(), rows["id"].to_numpy()], axis=1)
    if numeric:
        fig.add_trace(go.Scatter(
            x=xy[:, 0], y=xy[:, 1], mode="markers", customdata=custom, text=[label(v) for v in values],
            hovertemplate=hover, name=col, showlegend=False,
            marker=dict(color=values, colorscale="Viridis", size=7, showscale=show_legend,
                        colorbar=dict(title=col))), row=1, col=subplot)
        return 1
    names = values.map(label)
    common = names.value_counts().index[:MAX_CATEGORIES - 1]
    names = names.where(names.isin(common), "other")
    palette = _palette()
    for k, name in enumerate(sorted(names.unique(), key=lambda v: (v == "other", v))):
        sel = (names == name).to_numpy()
        fig.add_trace(go.Scatter(
            x=xy[sel, 0], y=xy[sel, 1], mode="markers", customdata=custom[sel],
            text=names[sel].tolist(), hovertemplate=hover, name=name[:60], legendgroup=name,
            showlegend=show_legend, marker=dict(size=7, color=palette[k % len(palette)])), row=1, col=subplot)
    return len(names.unique())


def _palette() -> list[str]:
    import plotly.express as px

    return px.colors.qualitative.Dark24


def latent_figure(rows, pca: np.ndarray, pick: np.ndarray, tsne: np.ndarray, columns: list[str]):
    """PCA and t-SNE side by side; a dropdown picks the column the points are coloured by."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"PCA ({len(rows)} images)",
                                                        f"t-SNE ({len(pick)} of them)"))
    counts = []
    for col in columns:
        n = colour_traces(fig, pca, rows, col, 1, True)
        m = colour_traces(fig, tsne, rows.iloc[pick], col, 2, False) if len(pick) else 0
        counts.append(n + m)
    buttons = []
    for i, col in enumerate(columns):
        visible = [j == i for j, c in enumerate(counts) for _ in range(c)]
        buttons.append(dict(label=col, method="restyle", args=[{"visible": visible}]))
    for trace, v in zip(fig.data, buttons[0]["args"][0]["visible"] if buttons else []):
        trace.visible = v
    fig.update_layout(height=580, margin=dict(t=90, l=30, r=30, b=30), legend=dict(itemsizing="constant"),
                      updatemenus=[dict(buttons=buttons, x=0.08, xanchor="left", y=1.2, yanchor="top",
                                        showactive=True)],
                      annotations=[*fig.layout.annotations,
                                   dict(text="colour by", x=0, xref="paper", y=1.17, yref="paper",
                                        showarrow=False, xanchor="left")])
    return fig


def figure_html(fig, hover_thumbnails: bool = False) -> str:
    """A plotly figure as an HTML fragment (plotly.js itself is inlined once by the template).
    With hover_thumbnails, hovering a point shows its thumbnail (customdata[0] indexes the
    page's THUMBS list) in the page's #hover-thumb box."""
    post = "sdbatchHoverThumbs(document.getElementById('{plot_id}'));" if hover_thumbnails else None
    return fig.to_html(full_html=False, include_plotlyjs=False, post_script=post,
                       config={"displaylogo": False, "responsive": True})


def time_histogram(seconds: np.ndarray):
    """Binned here (numpy), so the page holds 60 bars, not a million values."""
    import plotly.graph_objects as go

    seconds = seconds[np.isfinite(seconds)]
    counts, edges = np.histogram(seconds, bins=min(60, max(10, len(seconds) // 5)))
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges),
                           customdata=np.stack([edges[:-1], edges[1:]], axis=1),
                           hovertemplate="%{customdata[0]:.3g}-%{customdata[1]:.3g} s: %{y} images<extra></extra>"))
    fig.update_layout(height=320, margin=dict(t=20, l=40, r=20, b=40), bargap=0.05, yaxis_title="images",
                      xaxis_title="seconds per image (its batch's time / batch size)")
    return fig


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


def run_context(out: Output, run: dict[str, Any], sample: int, tsne_sample: int, seed: int,
                sheet_prompts: int, sheet_per_prompt: int) -> dict[str, Any]:
    """Everything the template shows for the output of `jobs run`."""
    import pandas as pd

    from sdbatch.jobs.plan import PLAN_COLUMNS

    manifest = read_parts(out, "manifest")
    errors = read_parts(out, "errors")
    n_err = 0 if errors is None else len(errors)
    ctx: dict[str, Any] = dict(kind="run", run=run, errors=[], n_errors=n_err, images=0, thumbs=[], flagged=0)
    if errors is not None:
        shown = errors.sort_values("row").head(200).astype(object)
        ctx["errors"] = shown.where(shown.notna(), None).to_dict("records")  # a null prompt shows empty, not "nan"
    wall = seconds_between(run.get("started"), run.get("finished"))
    ctx.update(wall=wall, remaining=max(0, run.get("rows", 0) - n_err - (0 if manifest is None else len(manifest))))
    if manifest is None or manifest.empty:
        return ctx
    # rates count every generated row; the page shows the rows with an image (a row the safety
    # checker flagged is recorded with nsfw true and none)
    busy = float(manifest["seconds"].sum())
    ctx.update(workers=int(manifest["worker"].nunique()), busy=busy, rate=len(manifest) / busy if busy else None,
               wall_rate=len(manifest) / wall if wall else None, model_hash=manifest["model_hash"].iloc[0],
               flagged=int(manifest["image"].isna().sum()), histogram=figure_html(time_histogram(
                   manifest["seconds"].to_numpy())))
    manifest = manifest[manifest["image"].notna()].sort_values("id").reset_index(drop=True)
    if manifest.empty:
        return ctx
    if "latent" not in manifest.columns:
        manifest["latent"] = None
    manifest["_image"] = relative(out, manifest["image"], "images")
    manifest["_latent"] = relative(out, manifest["latent"].astype(object), "latents")
    carried = [c for c in manifest.columns if c not in PLAN_COLUMNS and c not in FILE_COLUMNS
               and not c.startswith("_") and c not in ("seconds", "worker")]
    n = ctx["images"] = len(manifest)

    # which images the page shows: the contact sheet's, the grids', the latent sample
    prompts = list(dict.fromkeys(manifest["prompt"]))
    sheet = manifest[manifest["prompt"].isin(prompts[:sheet_prompts])].groupby("prompt", sort=False).head(sheet_per_prompt)
    swept = swept_columns(manifest, carried)
    grid_rows = pd.DataFrame()
    if swept:
        axes = swept[:2]
        grid_rows = manifest[manifest["prompt"].isin(prompts[:8])].drop_duplicates(["prompt", *axes])
    latent = sample_rows(manifest, sample, seed)
    shown = pd.concat([sheet, grid_rows, latent]).drop_duplicates("id")
    print(f"report: {n} images; reading {len(shown)} of them for thumbnails", file=sys.stderr)
    files = fetch(out, shown["_image"].tolist())
    thumbs, index = [], {}
    on_sheet = set(sheet["id"]) | set(grid_rows.get("id", []))
    for image_id, name in zip(shown["id"], shown["_image"]):
        index[image_id] = len(thumbs)
        thumbs.append(thumbnail(files.get(name), THUMB_PX if image_id in on_sheet else HOVER_PX))
    manifest["_thumb"] = manifest["id"].map(index).fillna(-1).astype(int)
    sheet = manifest.loc[sheet.index]
    ctx.update(thumbs=thumbs, missing=int(sum(t is None for t in thumbs)))

    def card(r) -> dict[str, Any]:
        detail = ", ".join(f"{c} {label(r[c])}" for c in ["seed", *swept])
        return dict(id=r["id"], thumb=thumbs[r["_thumb"]], href=r["_image"], detail=detail,
                    title=f"{r['prompt']}\n{detail}\nid {r['id']}")

    ctx["sheet"] = [dict(prompt=p, cards=[card(r) for _, r in g.iterrows()],
                         count=int((manifest["prompt"] == p).sum()))
                    for p, g in sheet.groupby("prompt", sort=False)]
    ctx["sheet_prompts"], ctx["all_prompts"] = min(len(prompts), sheet_prompts), len(prompts)
    ctx["sheet_per_prompt"] = sheet_per_prompt
    ctx["swept"] = swept
    ctx["grids"] = sweep_grids(manifest, swept[:2], prompts[:8], card) if swept else []

    metrics_path = out.path("metrics.json")
    if storage.exists(out.fs, metrics_path):
        ctx["metrics"] = json.loads(storage.read_bytes(out.fs, metrics_path))

    latent = manifest.loc[latent.index]
    got = fetch(out, latent["_latent"].dropna().tolist())
    kept = latent["_latent"].isin(list(got))
    if kept.all():
        ctx["latent_source"] = "latents"
        feats = latent_features([np.load(io.BytesIO(got[p]), allow_pickle=False) for p in latent["_latent"]])
    else:  # a run made before latents were kept, or some deleted: the images' pixels
        ctx["latent_source"] = "pixels"
        ctx["latents_missing"], ctx["latent_sampled"] = int((~kept).sum()), len(latent)
        latent = latent[[thumbs[i] is not None for i in latent["_thumb"]]]
        feats = np.stack([np.asarray(open_image(files[p]).convert("RGB").resize((FEATURE_GRID, FEATURE_GRID)),
                                     np.float32).transpose(2, 0, 1).ravel() for p in latent["_image"]]
                         or [np.zeros(3 * FEATURE_GRID**2, np.float32)])[:len(latent)]
    ctx["latent_n"], ctx["latent_of"] = len(latent), n
    if len(latent) >= 2:
        print(f"report: PCA of {len(latent)} images, t-SNE of {min(tsne_sample, len(latent))}", file=sys.stderr)
        pca, pick, tsne = embed(feats, tsne_sample, seed)
        fig = latent_figure(latent.reset_index(drop=True), pca, pick, tsne, varying_columns(
            latent.drop(columns=[c for c in latent.columns if c.startswith("_")])) or ["prompt"])
        ctx["latent_plot"] = figure_html(fig, hover_thumbnails=True)
        ctx["tsne_n"] = len(pick)
    return ctx


def sweep_grids(manifest, axes: list[str], prompts: list[str], card) -> list[dict[str, Any]]:
    """Per prompt, a table of images: rows = values of axes[0], columns = values of axes[1]
    (one column when one setting is swept); each cell the first image with those values."""
    def values(c):
        return sorted(manifest[c].dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v))

    row_axis, col_axis = axes[0], (axes[1] if len(axes) > 1 else None)
    rows, cols = values(row_axis), (values(col_axis) if col_axis else [None])
    grids = []
    for prompt in prompts:
        sub = manifest[manifest["prompt"] == prompt]
        cells = []
        for rv in rows:
            line = []
            for cv in cols:
                hit = sub[(sub[row_axis] == rv) & ((sub[col_axis] == cv) if col_axis else True)]
                line.append(card(hit.iloc[0]) if len(hit) and hit.iloc[0]["_thumb"] >= 0 else None)
            cells.append(dict(value=label(rv), cells=line))
        grids.append(dict(prompt=prompt, rows=cells))
    return [dict(row_axis=row_axis, col_axis=col_axis, cols=[label(c) for c in cols], grids=grids)]


# ----------------------------------------------------------------------------- a training run


def train_context(out: Output, record: dict[str, Any], data_sample: int) -> dict[str, Any]:
    """Everything the template shows for the output of `jobs train`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ctx: dict[str, Any] = dict(kind="train", run=record,
                               wall=seconds_between(record.get("started"), record.get("finished")))
    log_path = out.path("train_log.parquet")
    if storage.exists(out.fs, log_path):
        log = storage.read_parquet(out.fs, log_path).to_pandas()
        smooth = log["loss"].ewm(alpha=0.1).mean()
        fig = make_subplots(rows=1, cols=3, column_widths=[0.5, 0.25, 0.25],
                            subplot_titles=("loss (log scale)", "learning rate", "gradient norm"))
        fig.add_trace(go.Scatter(x=log["step"], y=log["loss"], name="loss", mode="lines", opacity=0.4), 1, 1)
        fig.add_trace(go.Scatter(x=log["step"], y=smooth, name="loss, smoothed (EMA 0.1)", mode="lines"), 1, 1)
        fig.add_trace(go.Scatter(x=log["step"], y=log["learning_rate"], name="learning rate", mode="lines",
                                 showlegend=False), 1, 2)
        fig.add_trace(go.Scatter(x=log["step"], y=log["grad_norm"], name="gradient norm", mode="lines",
                                 showlegend=False), 1, 3)
        fig.update_yaxes(exponentformat="e", rangemode="tozero", row=1, col=2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_xaxes(title_text="step")
        fig.update_layout(height=380, margin=dict(t=40, l=40, r=40, b=40))
        ctx["loss_plot"] = figure_html(fig)
        ctx["steps_logged"] = int(log["step"].max())
        ctx["last_loss"] = float(smooth.iloc[-1])
        ctx["samples_per_s"] = float(log["samples_per_s"].median()) if "samples_per_s" in log else None
    samples = storage.list_files(out.fs, out.path("samples"), ".png")
    ctx["validation"] = []
    for path in samples:
        name = posixpath.basename(path)
        step = int(name.removeprefix("step-").removesuffix(".png")) if name.startswith("step-") else name
        data = storage.read_bytes(out.fs, path)
        width = open_image(data).width  # small grids shown at a whole multiple of their size
        ctx["validation"].append(dict(step=step, src=png_data_uri(data), href=f"samples/{name}",
                                      width=min(640, width * max(1, -(-256 // width)))))
    ctx["prompts"] = record.get("settings", {}).get("validation_prompts") or []
    errors = read_parts(out, "errors")
    ctx["n_errors"] = 0 if errors is None else len(errors)
    ctx["errors"] = [] if errors is None else errors.head(200).to_dict("records")
    ctx["dataset"], ctx["dataset_error"] = [], None
    settings = record.get("settings", {})
    if settings.get("data") and data_sample:
        try:
            ctx["dataset"] = dataset_sample(settings["data"], settings.get("caption_column", "text"), data_sample)
        except Exception as exc:  # the data may have moved since: the rest of the report stands
            ctx["dataset_error"] = f"{settings['data']} could not be read ({exc})"
    return ctx


def dataset_sample(data: str, caption_column: str, n: int) -> list[dict[str, Any]]:
    """The first n readable rows of the training tables: thumbnail and caption."""
    from PIL import Image

    from sdbatch.jobs.train_data import decode_rows, plan_row_groups, read_row_group

    groups, _ = plan_row_groups(data, caption_column)
    shown: list[dict[str, Any]] = []
    for group in groups:
        table = read_row_group(group["file"], group["group"]).slice(0, n - len(shown))
        samples, _ = decode_rows(table, group["first"], THUMB_PX, caption_column)
        for s in samples:
            im = Image.frombytes("RGB", (s["width"], s["height"]), s["pixels"])
            shown.append(dict(id=s["id"], caption=s["caption"], thumb=data_uri(im)))
        if len(shown) >= n:
            break
    return shown


# ----------------------------------------------------------------------------- the page


def number(value: float | int | None, fmt: str | None = None) -> str:
    """1234567 -> '1,234,567'; 11400.3 -> '11,400'; 0.1362 -> '0.136'; None -> '-'."""
    if value is None:
        return "-"
    if fmt:
        return fmt.format(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render(ctx: dict[str, Any]) -> str:
    import jinja2
    import plotly.offline

    env = jinja2.Environment(loader=jinja2.PackageLoader("sdbatch.jobs", "templates"),
                             autoescape=jinja2.select_autoescape(["j2", "html"]),
                             undefined=jinja2.StrictUndefined)
    env.filters["duration"] = lambda s: "-" if s is None else str(datetime.timedelta(seconds=round(s)))
    env.filters["num"] = number
    env.filters["tojson_compact"] = lambda v: json.dumps(v, separators=(",", ":"))
    return env.get_template("report.html.j2").render(plotlyjs=plotly.offline.get_plotlyjs(),
                                                     generated=datetime.datetime.now(datetime.timezone.utc)
                                                     .isoformat(timespec="seconds"), **ctx)


def write_report(uri: str, sample: int = 5000, tsne_sample: int = 2000, seed: int = 0,
                 sheet_prompts: int = 40, sheet_per_prompt: int = 12, data_sample: int = 16) -> str:
    """Writes OUT/report.html for the output of `jobs run` or `jobs train`; returns its URI.

    sample: images in the latent space (PCA), a random sample of that size when there are more;
    tsne_sample: of those, how many t-SNE places; sheet_prompts x sheet_per_prompt: the contact
    sheet's extent; data_sample: training rows shown. Raises JobError when OUT holds neither
    run.json nor train.json.
    """
    out = Output(uri)
    run = out.read_run()
    if run is not None:
        ctx = run_context(out, run, sample, tsne_sample, seed, sheet_prompts, sheet_per_prompt)
    elif storage.exists(out.fs, out.path("train.json")):
        ctx = train_context(out, json.loads(storage.read_bytes(out.fs, out.path("train.json"))), data_sample)
    else:
        raise JobError(f"{out.uri} has neither run.json nor train.json: not the output of `sdbatch.jobs run` "
                       f"or `sdbatch.jobs train`")
    ctx.update(out_uri=out.uri, sample=sample)
    storage.write_bytes(out.fs, out.path("report.html"), render(ctx).encode())
    return out.uri_of("report.html")


def add_report_arguments(parser) -> None:
    """The `report` subcommand's arguments."""
    parser.add_argument("output", help="the OUT of `jobs run` or `jobs train`; path or URI")
    parser.add_argument("--sample", type=int, default=5000,
                        help="images placed in the latent space by PCA; a larger run is sampled (default: %(default)s)")
    parser.add_argument("--tsne-sample", type=int, default=2000,
                        help="of those, images placed by t-SNE (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and t-SNE (default: %(default)s)")
    parser.set_defaults(handler=report_command)


def report_command(args) -> int:
    """`python -m sdbatch.jobs report OUT`: exit status 0, or 2 for bad options or an OUT that is
    no run (JobError)."""
    if args.sample < 1 or args.tsne_sample < 1:
        raise JobError("--sample and --tsne-sample must be at least 1")
    print(f"report: {write_report(args.output, args.sample, args.tsne_sample, args.seed)}", file=sys.stderr)
    return 0
