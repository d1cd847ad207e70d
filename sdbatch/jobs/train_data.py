"""The training job's data: image-caption Parquet tables checked on the driver, their row groups
decoded by Ray Data as a stream, and the stream turned into training batches on each worker.

A table has an `image` column (a Hugging Face `datasets` image struct of `bytes` and `path`,
binary, or a string path/URI) and a caption column (`text` by default); an `id` column names
rows, otherwise a row is named by its position in the tables (files in sorted order), as in
`jobs run`. Ray Data reads one row group per task and does the per-image work that is the same
in every epoch: decode the file as a person sees it (`sdbatch.images.read_image`: orientation,
RGB, transparency over white) and resize its shorter side to the resolution. Rows whose image
cannot be read, or whose caption is null, go to OUT/errors/ and are left out. What changes
from epoch to epoch is drawn on the worker from its checkpointed generator (`make_batch`): the
crop, the flip, the caption dropout; and so is the noise, so a resumed run repeats exactly the
draws of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from sdbatch import storage
from sdbatch.errors import JobError
from sdbatch.jobs.output import Output
from sdbatch.jobs.record import errors_table
from sdbatch.jobs.plan import type_ok, table_files

if TYPE_CHECKING:
    import torch

IMAGE_COLUMN = "image"
ROWS_PER_CHUNK = 16  # decoded rows per Ray Data block: a row group of big images stays in bounds


def _image_kind(t) -> str | None:
    """How an image column of Arrow type t holds its images: 'struct', 'binary', 'path' or None."""
    import pyarrow as pa

    if pa.types.is_struct(t) and ("bytes" in [f.name for f in t] or "path" in [f.name for f in t]):
        return "struct"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if type_ok("string", t) and not pa.types.is_null(t):
        return "path"
    return None


def check_table(schema, source: str, caption_column: str) -> None:
    """JobError naming the file and column for a missing image or caption column, or one of the
    wrong type (an image column must hold structs of bytes/path, binary, or string paths)."""
    have = ", ".join(schema.names) or "none"
    for name, what in ((IMAGE_COLUMN, "image"), (caption_column, "caption")):
        if name not in schema.names:
            raise JobError(f"{source}: the table has no {what} column {name!r} (its columns: {have})")
    if _image_kind(schema.field(IMAGE_COLUMN).type) is None:
        raise JobError(f"{source}: column 'image' has type {schema.field(IMAGE_COLUMN).type}; it must be "
                       f"an image struct (bytes, path), binary, or a string path")
    for name, kind in ((caption_column, "string"), ("id", "string or integer")):
        if name in schema.names and not type_ok(kind, schema.field(name).type):
            raise JobError(f"{source}: column {name!r} has type {schema.field(name).type}; it must be {kind}")


def plan_row_groups(data: str, caption_column: str) -> tuple[list[dict[str, Any]], int]:
    """The tables' row groups as Ray Data items (file URI, group index, position of its first
    row in the tables), after checking every file's columns; and the number of rows.
    Raises JobError for missing or empty tables and bad columns."""

    fs, files = table_files(data, "training table")
    groups, first = [], 0
    for path in files:
        uri = storage.to_uri(fs, path)
        meta = storage.read_parquet_metadata(fs, path)
        check_table(meta.schema.to_arrow_schema(), uri, caption_column)
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                groups.append(dict(file=uri, group=g, first=first))
            first += rows
    if not first:
        raise JobError(f"the tables at {data} have no rows")
    return groups, first


def read_row_group(uri: str, group: int):
    import pyarrow.parquet as pq

    fs, path = storage.url_to_fs(uri)

    def read():
        with fs.open(path, "rb") as f:  # no threads: see storage's note on pyarrow 26
            return pq.ParquetFile(f).read_row_group(group, use_threads=False)

    return storage.retry(read)


def _image_bytes(cell, kind: str) -> tuple[bytes | None, str]:
    """(file bytes or None when the cell holds none, the name errors give the image)."""
    if kind == "struct":
        data, path = (cell or {}).get("bytes"), (cell or {}).get("path")
        if data is not None:
            return data, path or "image bytes"
        cell = path
    elif kind == "binary":
        return cell, "image bytes"
    if cell is None:
        return None, "image"
    fs, path = storage.url_to_fs(cell)
    return storage.read_bytes(fs, path), cell


def resize_shorter_side(image, size: int):
    """A PIL image scaled (Lanczos) so that its shorter side is `size` pixels, aspect kept."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image if new == (w, h) else image.resize(new, resample=Image.Resampling.LANCZOS)


def decode_rows(table, first: int, resolution: int, caption_column: str) -> tuple[list[dict], list[dict]]:
    """A row group -> (samples: id, row, caption, pixels (H*W*3 uint8 bytes), height, width;
    errors: id, error, row (the row's position in `table`), for `errors_table`)."""
    from sdbatch.images import read_image

    kind = _image_kind(table.schema.field(IMAGE_COLUMN).type)
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    samples, errors = [], []
    for i, (cell, caption) in enumerate(zip(table.column(IMAGE_COLUMN).to_pylist(),
                                            table.column(caption_column).to_pylist())):
        row = first + i
        image_id = f"{row:08d}" if ids is None else str(ids[i])
        where = f"Row {row} (id {image_id!r})"
        problem = None
        if caption is None:
            problem = f"{where}: the caption ({caption_column!r}) is null."
        else:
            try:
                data, name = _image_bytes(cell, kind)
                if data is None:
                    problem = f"{where}: the image is null."
                else:
                    image = resize_shorter_side(read_image(data, name), resolution)
            except Exception as exc:  # unreadable file, missing path: the row's fault
                problem = f"{where}: the image cannot be read ({exc})."
        if problem:
            errors.append(dict(id=image_id, error=problem, row=i))
            continue
        samples.append(dict(id=image_id, row=row, caption=caption, pixels=image.tobytes(),
                            height=image.height, width=image.width))
    return samples, errors


def decode_row_groups(batch: dict[str, np.ndarray], output: str, resolution: int,
                      caption_column: str) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches function: row-group items -> decoded samples, ROWS_PER_CHUNK a block.

    Rows that fail are written to `output`/errors/ as a part named by their ids: every epoch
    decodes the group again, finds the same rows and writes the same part."""
    import pyarrow as pa

    for uri, group, first in zip(batch["file"], batch["group"], batch["first"]):
        table = read_row_group(str(uri), int(group))
        samples, errors = decode_rows(table, int(first), resolution, caption_column)
        if errors:
            t = errors_table(errors, table)  # rows as positions in the group, then in the tables
            rows = pa.array([int(first) + e["row"] for e in errors], pa.int64())
            Output(output).write_part("errors", t.set_column(t.schema.get_field_index("row"), "row", rows))
        for k in range(0, len(samples), ROWS_PER_CHUNK):
            chunk = samples[k:k + ROWS_PER_CHUNK]
            yield {name: np.array([s[name] for s in chunk], dtype=object if name in ("id", "caption", "pixels")
                                  else np.int64) for name in chunk[0]}


MAX_ITEMS = 10_000  # row-group items in one pass of the stream


def training_dataset(groups: list[dict[str, Any]], rows: int, samples: int, output: str, resolution: int,
                     caption_column: str, data_cpus: float, env: dict[str, str]):
    """The Ray Data stream of decoded samples: one task per row group, asking for data_cpus,
    with `env` (e.g. the S3 endpoint) in its environment.

    One pass of the stream goes through the tables as many times as `samples` (what the run
    will take) needs, up to MAX_ITEMS row groups: every pass starts a Ray Data execution, which
    costs seconds, so a small table is not read in small passes."""
    import ray.data

    repeats = max(1, min(-(-samples // rows), MAX_ITEMS // len(groups)))
    items = groups * repeats
    return ray.data.from_items(items, override_num_blocks=min(len(items), 1000)).map_batches(
        decode_row_groups, fn_args=(output, resolution, caption_column), batch_size=1,
        batch_format="numpy", num_cpus=data_cpus,
        **({"runtime_env": {"env_vars": env}} if env else {}))


# ----------------------------------------------------------------------------- on the worker


class SampleStream:
    """A worker's samples, pass after pass ("epoch") of its dataset shard, from a position that
    a checkpoint records: `epoch` and `position` (samples of that pass already taken)."""

    def __init__(self, shard, epoch: int = 0, position: int = 0):
        self.shard, self.epoch, self.position = shard, epoch, position
        self._rows = self._iterate()

    def _iterate(self) -> Iterator[dict[str, Any]]:
        while True:
            skip, seen = self.position, 0
            for block in self.shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                n = len(block["id"])
                for i in range(n):
                    seen += 1
                    if seen <= skip:
                        continue
                    self.position = seen
                    yield {k: v[i] for k, v in block.items()}
            if not seen:
                raise JobError("no row of the tables could be read: see OUT/errors for why")
            self.epoch, self.position = self.epoch + 1, 0

    def take(self, n: int) -> list[dict[str, Any]]:
        return [next(self._rows) for _ in range(n)]


def make_batch(rows: list[dict[str, Any]], resolution: int, random_crop: bool, flip: bool,
               generator: torch.Generator) -> torch.Tensor:
    """Samples -> images (B, 3, resolution, resolution) float32 in [-1, 1].

    Each image is cropped to a square (at the centre, or at an offset drawn from `generator`),
    then flipped left-right with probability 1/2 when `flip` (one draw per image)."""
    import torch

    images = []
    for r in rows:
        h, w = int(r["height"]), int(r["width"])
        pixels = torch.frombuffer(bytearray(r["pixels"]), dtype=torch.uint8).reshape(h, w, 3)
        if random_crop:
            top = int(torch.randint(0, h - resolution + 1, (), generator=generator))
            left = int(torch.randint(0, w - resolution + 1, (), generator=generator))
        else:
            top, left = (h - resolution) // 2, (w - resolution) // 2
        pixels = pixels[top:top + resolution, left:left + resolution]
        if flip and float(torch.rand((), generator=generator)) < 0.5:
            pixels = pixels.flip(1)
        images.append(pixels.permute(2, 0, 1))
    return torch.stack(images).float() / 127.5 - 1.0
