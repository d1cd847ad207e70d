"""Recording a generation job's results: the actors' results turned into OUT/manifest and
OUT/errors Parquet parts, each id at most once, with pyarrow (no Python object per image)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from sdbatch.jobs.compact import Compactor
from sdbatch.jobs.output import Output


class Recorder:
    """Turns the actors' results into manifest and error parts, each image at most once: the
    first results at once, then every FLUSH_S seconds or FLUSH_ROWS rows, and at the end.

    A block of results (GenerationActor's output) holds each image's plan columns (PLAN_COLUMNS,
    row, plan_index, and `carried`, a struct of the table's other columns, when it has any) and
    its result columns (actors.result_schema). `source` (plan.Source, or a pyarrow Table) gives
    an error record its row's own columns. The driver holds one bit per image (`seen`) and the
    rows not yet flushed."""

    FLUSH_ROWS, FLUSH_S = 512, 5.0

    def __init__(self, out: Output, source, num_images: int):
        self.out, self.source = out, source
        self.seen = np.zeros(num_images, dtype=bool)  # by plan_index: a retried task can deliver an image again
        self.done: list[Any] = []
        self.failed: list[Any] = []
        self.pending = 0
        self.model_hash: str | None = None
        self.last_flush = -math.inf  # the first results are recorded at once
        self.compactor = Compactor(out)  # merges the parts in the background as they pile up

    def add(self, block) -> tuple[int, int]:
        """Queues a block of results (pyarrow Table); returns (new images, new errors)."""
        import pyarrow.compute as pc

        index = block.column("plan_index").to_numpy()
        _, first = np.unique(index, return_index=True)
        first = np.sort(first[~self.seen[index[first]]])
        self.seen[index[first]] = True
        block = block.take(first)
        if self.model_hash is None and block.num_rows:
            hashes = block.column("model_hash").drop_null()
            self.model_hash = hashes[0].as_py() if len(hashes) else None
        failed = pc.is_valid(block.column("error"))
        done, errors = block.filter(pc.invert(failed)), block.filter(failed)
        self.done += [done] if done.num_rows else []
        self.failed += [errors] if errors.num_rows else []
        self.pending += block.num_rows
        if self.pending >= self.FLUSH_ROWS or time.monotonic() - self.last_flush > self.FLUSH_S:
            self.flush()
        return done.num_rows, errors.num_rows

    def flush(self) -> None:
        import pyarrow as pa

        if self.done:
            rows = manifest_table(pa.concat_tables(self.done))
            self.out.write_part("manifest", rows)
            self.compactor.wrote("manifest", rows.num_rows)
            self.done = []
        if self.failed:
            rows = errors_table(pa.concat_tables(self.failed), self.source)
            self.out.write_part("errors", rows)
            self.compactor.wrote("errors", rows.num_rows)
            self.failed = []
        self.pending = 0
        self.last_flush = time.monotonic()


def manifest_table(results):
    """Manifest rows (manifest_schema, then the carried columns) from a table of results."""
    import pyarrow.compute as pc

    schema = manifest_schema()
    table = results.select(schema.names).cast(schema)
    if "carried" in results.column_names:
        carried = results.column("carried")
        for field in carried.type:
            table = table.append_column(field, pc.struct_field(carried, field.name))
    return table


def manifest_schema():
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    return pa.schema([("id", s), ("prompt", s), ("negative_prompt", s), ("seed", pa.int64()),
                      ("steps", i), ("cfg_scale", f), ("sampler", s), ("width", i), ("height", i),
                      ("init_image", s), ("strength", f), ("image", s), ("latent", s), ("sha256", s),
                      ("model_hash", s), ("seconds", f), ("worker", s),
                      # safeguards: flagged by the safety checker (then no image), marks carried
                      ("nsfw", pa.bool_()), ("watermark", pa.bool_()), ("c2pa", pa.bool_())])


def errors_table(errors, table):
    """id, error, row (its position in the table), then the row's own columns (bar `id`).
    errors: a pyarrow Table with id, error and row (other columns ignored) or a list of such dicts;
    table: what gives rows by position (`take`): a pyarrow Table or a plan.Source."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("error", pa.string()), ("row", pa.int64())])
    t = (errors.select(schema.names).cast(schema) if isinstance(errors, pa.Table)
         else pa.Table.from_pylist(errors, schema=schema))
    source = table.take(t.column("row").to_numpy())
    for name in source.column_names:
        if name != "id":
            t = t.append_column(source.schema.field(name), source.column(name))
    return t
