"""A job's output folder and what is recorded in it: images/, manifest/ and errors/ Parquet
parts (named by the hash of their ids, so no row is ever written twice), run.json."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sdbatch import storage
from sdbatch.jobs import compact

T = TypeVar("T")
READ_THREADS = 16  # files read at once (I/O-bound: footers and id columns)


def _read_columns(fs, path: str, columns: list[str] | None):
    """A Parquet file's columns (all when None); only those bytes are fetched when some are named."""
    return storage.read_parquet(fs, path) if columns is None else storage.read_parquet_columns(fs, path, columns)


def _each(fn: Callable[[str], T], files: list[str]) -> list[T]:
    """[fn(file) for file in files], READ_THREADS at a time: on an object store each read is a
    round trip, so an OUT of many uncompacted parts is read in a fraction of the time."""
    if len(files) < 2:
        return [fn(p) for p in files]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(fn, files))


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

    def parts(self, folder: str) -> list[str]:
        """Paths of the Parquet files holding OUT/folder's rows ("manifest" or "errors"), each row
        in exactly one: what a compaction in progress or killed replaces is left out (compact.py)."""
        return compact.live_files(self.fs, self.path(folder))

    def id_column(self, folder: str):
        """The ids of OUT/folder's rows, as a pyarrow ChunkedArray of strings (one chunk per file,
        no Python objects), each recorded id once. Raises JobError naming an unreadable file."""
        import pyarrow as pa

        def read(files):
            columns = _each(lambda p: _read_columns(self.fs, p, ["id"]).column("id"), files)
            return pa.chunked_array([c for column in columns for c in column.chunks], type=pa.string())

        return compact.read_live(self.fs, self.path(folder), read)

    def ids(self, folder: str) -> list[str]:
        return self.id_column(folder).to_pylist()

    def count(self, folder: str) -> int:
        """Rows recorded in OUT/folder, from the files' footers (each id is in one row: the
        recorder writes an id once per run, a run skips recorded ids, and compaction moves rows
        without copying them). Raises JobError naming an unreadable file."""
        return compact.read_live(self.fs, self.path(folder), lambda files: sum(
            _each(lambda p: storage.read_parquet_metadata(self.fs, p).num_rows, files)))

    def read(self, folder: str, columns: list[str] | None = None):
        """OUT/folder's rows ("manifest" or "errors") as one pyarrow Table, the files' columns
        unified (or only those of `columns` they have); None when there are none. Raises JobError
        naming an unreadable file."""
        import pyarrow as pa

        def read(files):
            tables = [_read_columns(self.fs, p, columns) for p in files]
            return pa.concat_tables(tables, promote_options="permissive") if tables else None

        return compact.read_live(self.fs, self.path(folder), read)

    def flagged(self) -> set[str]:
        """Ids of the manifest's rows the safety checker flagged (nsfw true: no image kept)."""
        import pyarrow.compute as pc

        def read(files):
            ids: set[str] = set()
            for path in files:
                if "nsfw" in storage.read_parquet_schema(self.fs, path).names:  # runs before the safeguards had none
                    t = _read_columns(self.fs, path, ["id", "nsfw"])
                    ids.update(t.filter(pc.fill_null(t["nsfw"], False))["id"].to_pylist())
            return ids

        return compact.read_live(self.fs, self.path("manifest"), read)

    def write_part(self, folder: str, table) -> None:
        name = _part_name(table.column("id").to_pylist())
        storage.write_parquet(self.fs, self.path(folder, name), table)

    def clear(self) -> None:
        for name in ("images", "latents", "manifest", "errors", "run.json"):
            storage.remove(self.fs, self.path(name))


def counts(out: Output, ids=None) -> tuple[int, int]:
    """(images recorded, error records), optionally only those of the given ids (a set of str or
    a pyarrow array of strings)."""
    if ids is None:
        return out.count("manifest"), out.count("errors")
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    wanted = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
    return tuple(int(pc.sum(pc.is_in(out.id_column(folder), value_set=wanted)).as_py() or 0)
                 for folder in ("manifest", "errors"))


def summary(out: Output, ids, total: int) -> int:
    """Prints a run's outcome for the table's ids (a pyarrow string array); returns its exit status."""
    import pyarrow as pa
    import pyarrow.compute as pc

    done, failed = counts(out, ids)
    remaining = max(0, total - done - failed)
    print(f"done: {done}, errored: {failed}, remaining: {remaining}", file=sys.stderr)
    print(f"images: {out.uri_of('images')}  manifest: {out.uri_of('manifest')}", file=sys.stderr)
    flagged = pa.array(sorted(out.flagged()), pa.string())
    flagged = int(pc.sum(pc.is_in(flagged, value_set=ids)).as_py() or 0) if len(flagged) else 0
    if flagged:
        print(f"{flagged} images flagged by the safety checker: recorded with nsfw true, no image kept",
              file=sys.stderr)
    if failed:
        print(f"{failed} rows failed: see {out.uri_of('errors')} (delete it and re-run to retry them)",
              file=sys.stderr)
    return 1 if failed or remaining else 0
