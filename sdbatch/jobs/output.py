"""A job's output folder and what is recorded in it: images/, manifest/ and errors/ Parquet
parts (named by the hash of their ids, so no row is ever written twice), run.json."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any

from sdbatch import storage
from sdbatch.jobs.plan import COLUMN_KINDS


def _part_name(ids: list[str]) -> str:
    return f"part-{hashlib.sha256(chr(0).join(sorted(ids)).encode()).hexdigest()[:20]}.parquet"


class Output:
    """OUT/: images/, latents/ (each image's final latent, .npy), manifest/*.parquet, errors/*.parquet,
    run.json."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = storage.url_to_fs(uri)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return storage.to_uri(self.fs, self.path(*parts))

    def read_run(self) -> dict[str, Any] | None:
        if not storage.exists(self.fs, self.path("run.json")):
            return None
        return json.loads(storage.read_bytes(self.fs, self.path("run.json")))

    def write_run(self, run: dict[str, Any]) -> None:
        storage.write_bytes(self.fs, self.path("run.json"), json.dumps(run, indent=2).encode())

    def ids(self, folder: str) -> list[str]:
        ids = []
        for path in storage.list_files(self.fs, self.path(folder), ".parquet"):
            ids += storage.read_parquet(self.fs, path, columns=["id"]).column("id").to_pylist()
        return ids

    def read(self, folder: str):
        """OUT/folder's Parquet parts ("manifest" or "errors") as one pyarrow Table, their columns
        unified; None when there are none. Raises JobError naming an unreadable part."""
        import pyarrow as pa

        parts = [storage.read_parquet(self.fs, p) for p in storage.list_files(self.fs, self.path(folder), ".parquet")]
        return pa.concat_tables(parts, promote_options="permissive") if parts else None

    def flagged(self) -> set[str]:
        """Ids of the manifest's rows the safety checker flagged (nsfw true: no image kept)."""
        ids: set[str] = set()
        for path in storage.list_files(self.fs, self.path("manifest"), ".parquet"):
            if "nsfw" in storage.read_parquet_schema(self.fs, path).names:  # runs before the safeguards had none
                t = storage.read_parquet(self.fs, path, columns=["id", "nsfw"]).to_pydict()
                ids.update(i for i, flag in zip(t["id"], t["nsfw"]) if flag)
        return ids

    def write_part(self, folder: str, table) -> None:
        name = _part_name(table.column("id").to_pylist())
        storage.write_parquet(self.fs, self.path(folder, name), table)

    def clear(self) -> None:
        for name in ("images", "latents", "manifest", "errors", "run.json"):
            storage.remove(self.fs, self.path(name))


# ----------------------------------------------------------------------------- recording results


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
            self.done = []
        if self.failed:
            self.out.write_part("errors", errors_table(self.failed, self.table))
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


def counts(out: Output, ids: set[str] | None = None) -> tuple[int, int]:
    """(images recorded, error records), optionally only those of the given ids."""
    done, failed = set(out.ids("manifest")), out.ids("errors")
    if ids is not None:
        done, failed = done & ids, [i for i in failed if i in ids]
    return len(done), len(failed)


def summary(out: Output, ids: set[str], total: int) -> int:
    done, failed = counts(out, ids)
    remaining = max(0, total - done - failed)
    print(f"done: {done}, errored: {failed}, remaining: {remaining}", file=sys.stderr)
    print(f"images: {out.uri_of('images')}  manifest: {out.uri_of('manifest')}", file=sys.stderr)
    flagged = len(out.flagged() & ids)
    if flagged:
        print(f"{flagged} images flagged by the safety checker: recorded with nsfw true, no image kept",
              file=sys.stderr)
    if failed:
        print(f"{failed} rows failed: see {out.uri_of('errors')} (delete it and re-run to retry them)",
              file=sys.stderr)
    return 1 if failed or remaining else 0
