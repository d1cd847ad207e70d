"""Recording a generation job's results: the actors' results turned into OUT/manifest and
OUT/errors Parquet parts, each id at most once."""

from __future__ import annotations

import math
import time
from typing import Any

from sdbatch.jobs.compact import Compactor
from sdbatch.jobs.output import Output
from sdbatch.jobs.plan import COLUMN_KINDS


class Recorder:
    """Turns the actors' results into manifest and error parts, each id at most once: the
    first results at once, then every FLUSH_S seconds or FLUSH_ROWS rows, and at the end."""

    FLUSH_ROWS, FLUSH_S = 512, 5.0

    def __init__(self, out: Output, table, plan_rows: dict[str, dict[str, Any]]):
        self.out, self.table, self.plan_rows = out, table, plan_rows
        self.carried = [c for c in table.column_names if c not in COLUMN_KINDS]
        self.recorded: set[str] = set()
        self.done: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.model_hash: str | None = None
        self.last_flush = -math.inf  # the first results are recorded at once
        self.compactor = Compactor(out)  # merges the parts in the background as they pile up

    def add(self, results: list[dict[str, Any]]) -> tuple[int, int]:
        """Queues results; returns (new images, new errors)."""
        ok = err = 0
        for res in results:
            if res["id"] in self.recorded:  # a retried task can deliver a row again
                continue
            self.recorded.add(res["id"])
            self.model_hash = self.model_hash or res["model_hash"]
            plan = self.plan_rows[res["id"]]
            if res["error"] is None:
                self.done.append(dict(plan, **{k: res[k] for k in ("image", "latent", "sha256", "model_hash", "seconds",
                                                                    "worker", "nsfw", "watermark", "c2pa")}))
                ok += 1
            else:
                self.failed.append(dict(id=res["id"], error=res["error"], row=plan["row"]))
                err += 1
        if len(self.done) + len(self.failed) >= self.FLUSH_ROWS or time.monotonic() - self.last_flush > self.FLUSH_S:
            self.flush()
        return ok, err

    def flush(self) -> None:
        if self.done:
            self.out.write_part("manifest", self.manifest_table(self.done))
            self.compactor.wrote("manifest", len(self.done))
            self.done = []
        if self.failed:
            self.out.write_part("errors", errors_table(self.failed, self.table))
            self.compactor.wrote("errors", len(self.failed))
            self.failed = []
        self.last_flush = time.monotonic()

    def manifest_table(self, rows: list[dict[str, Any]]):
        import pyarrow as pa

        t = pa.Table.from_pylist(rows, schema=manifest_schema())
        carried = self.table.take([r["row"] for r in rows]).select(self.carried)
        for name in self.carried:
            t = t.append_column(carried.schema.field(name), carried.column(name))
        return t


def manifest_schema():
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    return pa.schema([("id", s), ("prompt", s), ("negative_prompt", s), ("seed", pa.int64()),
                      ("steps", i), ("cfg_scale", f), ("sampler", s), ("width", i), ("height", i),
                      ("init_image", s), ("strength", f), ("image", s), ("latent", s), ("sha256", s),
                      ("model_hash", s), ("seconds", f), ("worker", s),
                      # safeguards: flagged by the safety checker (then no image), marks carried
                      ("nsfw", pa.bool_()), ("watermark", pa.bool_()), ("c2pa", pa.bool_())])


def errors_table(errors: list[dict[str, Any]], table):
    """id, error, row (its position in the table), then the row's own columns (bar `id`)."""
    import pyarrow as pa

    t = pa.Table.from_pylist(errors, schema=pa.schema([("id", pa.string()), ("error", pa.string()),
                                                       ("row", pa.int64())]))
    source = table.take([e["row"] for e in errors])
    for name in source.column_names:
        if name != "id":
            t = t.append_column(source.schema.field(name), source.column(name))
    return t
