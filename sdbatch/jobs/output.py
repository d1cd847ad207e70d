"""A job's output folder and what is recorded in it: images/, manifest/ and errors/ Parquet
parts (named by the hash of their ids, so no row is ever written twice), run.json."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from sdbatch import storage


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
