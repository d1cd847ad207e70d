"""Ray actor classes: each loads a model once, then turns batches of table rows into outputs.

Ray Data calls an actor with one batch (a pyarrow Table) at a time and collects what it
returns. The actors know nothing of the job's plan: `sdbatch.jobs.generate` decides which rows go
where and writes the manifest from what the actors return.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
import time
from typing import Any

import numpy as np

from sdbatch import storage
from sdbatch.a1111 import a1111_parameters
from sdbatch.safeguards import SafeguardSettings, Safeguards

# ----------------------------------------------------------------------------- image generation

_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def safe_name(image_id: str) -> str:
    """A file name for an id that can never leave its folder.

    Ids made of letters, digits, `_`, `-` and inner `.` (at most 100 characters, not ending
    in `.`) are used as they are; any other id becomes its safe characters plus the first 16
    hex digits of its sha256 (`a/../b` -> `a____b-<hash>`), so distinct ids stay distinct.
    """
    if _SAFE_ID.fullmatch(image_id) and not image_id.endswith("."):
        return image_id
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", image_id)[:80]
    return f"{stem}-{hashlib.sha256(image_id.encode()).hexdigest()[:16]}"


def npy_bytes(array: np.ndarray) -> bytes:
    """The array as a .npy file (numpy's format, read back with np.load(allow_pickle=False))."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class GenerationActor:
    """Generates whole batches of plan rows and writes their images to `output`/images/.

    Each input row is one batch: a column `rows`, the list of the batch's plan rows (structs of
    id, prompt, negative_prompt, seed, steps, cfg_scale, sampler, width, height, init_image,
    strength, row, skip, and anything else, such as the job's plan_index and carried columns,
    which is passed through), all of one shape. The batch is generated whole; rows marked `skip`
    (already recorded) are neither written nor returned. Beside each image
    `output`/latents/<name>.npy keeps its final latent, float16 (4, height/8, width/8), for the
    run report's latent space. `safeguards` (SafeguardSettings; default: the watermark only)
    screens each image with the safety checker (a flagged image is not written, nor its latent:
    its row comes back with nsfw true and no image) and marks the others (watermark, XMP, C2PA).
    Ray may run two calls at once (generate_on_ray asks it to): while one holds the model, the
    other marks and writes its images. Output rows: the input row's fields but skip, then image
    (URI), latent (URI), sha256, model_hash, seconds, worker, nsfw, watermark, c2pa, error (null
    unless the row failed); with `inception_weights` ([object ref of a state dict], `run
    --metrics`) also each image's Inception features and logits, computed while it is in memory
    (see `sdbatch.jobs.metrics.RunFeatures`).
    """

    def __init__(self, model: str, output: str, dtype: str = "auto", device: str = "auto",
                 threads: int | None = None, inception_weights: list | None = None,
                 safeguards: SafeguardSettings | None = None, ema: bool = True):
        import torch

        import sdbatch

        if threads:
            torch.set_num_threads(threads)
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = sdbatch.load_model(model, device=device, dtype=dtype, ema=ema)
        self.fs, self.images = storage.url_to_fs(storage.join(output, "images"))
        self.latents = storage.url_to_fs(storage.join(output, "latents"))[1]
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.safeguards = Safeguards(safeguards or SafeguardSettings(), device=str(self.model.device))
        self.busy = threading.Lock()  # the model (and the networks beside it): one call at a time
        self.inception = None
        if inception_weights:
            import ray

            from sdbatch.inception import build_inception

            self.inception = build_inception(ray.get(inception_weights[0]), str(self.model.device))

    def __call__(self, batch):
        import pyarrow as pa

        return pa.concat_tables([self.generate_table(pa.Table.from_struct_array(rows.values))
                                 for rows in batch.column("rows")])

    def generate_table(self, rows):
        """One batch's plan rows (pyarrow Table) -> its output rows (pyarrow Table)."""
        import pyarrow as pa

        passed = [c for c in rows.column_names if c == "carried"]  # kept as Arrow, never made Python objects
        plain = rows.drop_columns(passed).to_pylist()
        results = self.generate(plain)
        where = {r["id"]: k for k, r in enumerate(plain)}
        out = rows.drop_columns(["skip"]).take([where[r["id"]] for r in results])
        made = pa.Table.from_pylist(results, schema=result_schema(self.inception is not None)).drop_columns(["id"])
        for field, column in zip(made.schema, made.columns):
            out = out.append_column(field, column)
        return out

    def generate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import sdbatch
        from sdbatch.model.pipeline import NonFiniteError

        skipped = {r["id"] for r in rows if r["skip"]}
        results, init_images = [], None
        if rows[0]["init_image"] is not None:
            readable, init_images = [], []
            for row in rows:
                try:
                    init_images.append(self._read_image(row["init_image"]))
                    readable.append(row)
                except Exception as exc:  # ImageReadError, or the storage's own error
                    results.append(self._error(
                        row, f"Row {row.get('row', '?')} (id {row['id']!r}): init_image {row['init_image']!r} "
                             f"could not be read as an image ({exc})."))
            rows = readable
        if not rows:
            return [r for r in results if r["id"] not in skipped]
        first = rows[0]
        # A failure here (out of memory, a bug) is not the row's fault: it fails the task, so
        # the job stops with the error and a re-run retries these rows.
        with self.busy:
            start = time.perf_counter()
            nonfinite: set[int] = set()
            try:  # rows that overflow are retried in float32 inside generate()
                images, latents = sdbatch.generate(
                    self.model, [r["prompt"] for r in rows], [r["negative_prompt"] for r in rows],
                    seeds=[r["seed"] for r in rows], steps=first["steps"], cfg_scale=first["cfg_scale"],
                    sampler=first["sampler"], width=first["width"], height=first["height"],
                    init_images=init_images, strength=first["strength"], progress=False, return_latents=True)
            except NonFiniteError as exc:
                images, latents, nonfinite = exc.images, exc.latents, set(exc.rows)
            nsfw = self.safeguards.screen(images)  # before the watermark, as SD's scripts
            seconds = (time.perf_counter() - start) / len(rows)
            if self.inception is not None:
                from sdbatch.inception import extract_arrays

                features, logits = extract_arrays(self.inception, list(images))
        for k, (row, image) in enumerate(zip(rows, images)):
            if row["skip"]:
                continue
            if k in nonfinite:
                dtype = str(self.model.dtype).removeprefix("torch.")
                retried = "" if dtype == "float32" else f" in {dtype} and again in float32"
                results.append(dict(self._error(row, (
                    f"Row {row.get('row', '?')} (id {row['id']!r}): the image came out non-finite (NaN or inf)"
                    f"{retried}; no image was recorded. The checkpoint's weights (or these settings) overflow: "
                    f"check the model, or try --dtype float32.")), seconds=seconds))
                continue
            if nsfw[k]:
                results.append(dict(self._error(row, None), seconds=seconds, nsfw=True))
                continue
            name = safe_name(row["id"]) + ".png"
            marked = self.safeguards.mark(image, a1111_parameters(row, self.model.hash), title=name)
            png = marked.png
            path = storage.join(self.images, name)
            storage.write_bytes(self.fs, path, png)
            latent = storage.join(self.latents, safe_name(row["id"]) + ".npy")
            storage.write_bytes(self.fs, latent, npy_bytes(latents[k].astype(np.float16)))
            results.append(dict(id=row["id"], image=storage.to_uri(self.fs, path),
                                latent=storage.to_uri(self.fs, latent),
                                sha256=hashlib.sha256(png).hexdigest(), model_hash=self.model.hash,
                                seconds=seconds, worker=self.worker, nsfw=False, watermark=marked.watermark,
                                c2pa=marked.c2pa, error=None))
            if self.inception is not None:
                results[-1].update(inception_features=features[k], inception_logits=logits[k])
        return [r for r in results if r["id"] not in skipped]

    def _read_image(self, uri: str):
        from sdbatch.images import read_image

        fs, path = storage.url_to_fs(uri)
        return read_image(storage.read_bytes(fs, path), name=uri)

    def _error(self, row: dict[str, Any], message: str | None) -> dict[str, Any]:
        return dict(id=row["id"], image=None, latent=None, sha256=None, model_hash=self.model.hash, seconds=None,
                    worker=self.worker, nsfw=False, watermark=False, c2pa=False, error=message)


def result_schema(with_features: bool = False):
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("latent", pa.string()), ("sha256", pa.string()),
                        ("model_hash", pa.string()), ("seconds", pa.float64()),
                        ("worker", pa.string()), ("nsfw", pa.bool_()), ("watermark", pa.bool_()),
                        ("c2pa", pa.bool_()), ("error", pa.string())])
    if with_features:
        from sdbatch.metrics import FEATURE_DIM, NUM_CLASSES

        schema = schema.append(pa.field("inception_features", pa.list_(pa.float32(), FEATURE_DIM)))
        schema = schema.append(pa.field("inception_logits", pa.list_(pa.float32(), NUM_CLASSES)))
    return schema


# ----------------------------------------------------------------------------- quality metrics


class InceptionFeatureActor:
    """Turns shards of stored images into FID/IS/KID inputs with torch-fidelity's InceptionV3.

    Every call carries `weights`, [object ref of the Inception state dict] (loaded with
    weights_only once on the driver): the actor builds the network on its first call, so a
    restarted actor rebuilds it without constructor arguments in the object store. See
    `sdbatch.inception.extract_shard` for what a shard returns.
    """

    def __init__(self, threads: int | None = None, batch_size: int = 32):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self.batch_size = batch_size
        self.model = None

    def device(self) -> str:
        import torch

        return torch.cuda.get_device_name() if self._device == "cuda" else "cpu"

    def extract(self, index: int, spec: tuple, keep_features: bool, keep_logits: bool,
                weights: list) -> dict[str, Any]:
        import ray

        from sdbatch.inception import build_inception, extract_shard

        if self.model is None:
            self.model = build_inception(ray.get(weights[0]), self._device)
        return dict(extract_shard(self.model, spec, self.batch_size, keep_features, keep_logits), index=index)
