"""Compaction of a job's OUT/manifest and OUT/errors: the recorder's many small Parquet parts
merged into files of about SMALL_ROWS to MAX_ROWS rows, so that a long job leaves tens of files
rather than tens of thousands, and no kill at any moment loses or duplicates a row.

Object stores have no atomic rename (fsspec's mv is copy then delete), so a merge never renames.
It is a sequence of steps, each one atomic write or delete (a local write goes to a temporary
file that is renamed; an object store commits a PUT whole):

1. the folder's journal, `_compaction.json`, is written: a new `seq`, state "writing", the
   inputs' names and the output's name (`compacted-<seq>-<hash of inputs>.parquet`);
2. the output is written: every row of the inputs, once;
3. the journal's state becomes "written";
4. each input is deleted, one step each;
5. the journal's state becomes "done".

Readers (`live_files`) honour the journal: while it is "writing" or "written" and its output
exists, its inputs are not read, whether or not they are deleted yet; without the output, the
inputs are read. Every state between two steps therefore reads as exactly the rows recorded.
The next compaction first finishes an interrupted one whose output exists (deletes the inputs
left) or abandons one whose output does not (removes a local temporary file), then merges.

A reader that lists the folder while a compaction runs reads the journal before and after
listing, and lists again if it changed: inputs are deleted only in state "written", when the
output is already in place, so an unchanged journal means the listing is consistent. Files that
vanish while read (a newer compaction deleted them) make it list again too.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from sdbatch import storage
from sdbatch.errors import JobError



class Output(Protocol):
    """What compaction uses of a job's OUT (`sdbatch.jobs.output.Output`, which calls this module)."""

    uri: str
    fs: Any

    def path(self, *parts: str) -> str: ...

    def uri_of(self, *parts: str) -> str: ...

T = TypeVar("T")

JOURNAL = "_compaction.json"
FOLDERS = ("manifest", "errors")
# A merged file holds at most MAX_ROWS rows: a manifest row is ~0.2-0.5 KB in Arrow, so one file
# is at most a few hundred MB in memory for whoever reads it whole (the report's pandas frame,
# Ray Data's read tasks), and a 10M-row job is at least 10 files.
MAX_ROWS = 1_000_000
# Files under SMALL_ROWS rows are merged again; at or above it they are left as they are. Merges
# then happen every SMALL_ROWS rows (every 20 s at 5,000 rows/s), each small next to the job's
# cost, and a 10M-row job ends with at most ~100 files, whose footers `status` reads in a second.
SMALL_ROWS = 100_000
# While a job runs, small files are merged once they hold SMALL_ROWS rows, or once there are
# PILE_FILES of them: a slow job (one part each 5 s) is then compacted about every 20 minutes.
PILE_FILES = 256
# Rows per row group of a merged file: reads of a few columns (ids, images) stream in pieces.
ROW_GROUP_ROWS = 65_536
# Listings retried while compactions keep changing the folder under a reader.
LIST_ATTEMPTS = 10


# ----------------------------------------------------------------------------- reading


def read_journal(fs, folder: str) -> dict[str, Any] | None:
    """The folder's journal (seq, state, and while not "done": inputs, output), or None."""
    try:
        return json.loads(storage.read_bytes(fs, storage.join(folder, JOURNAL)))
    except FileNotFoundError:
        return None


def _live(listed: list[str], journal: dict[str, Any] | None) -> list[str]:
    if not journal or journal["state"] == "done":
        return listed
    names = {posixpath.basename(p) for p in listed}
    if journal["output"] not in names:  # not yet written: the inputs hold the rows
        return listed
    inputs = set(journal["inputs"])
    return [p for p in listed if posixpath.basename(p) not in inputs]


def snapshot(fs, folder: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(journal, the Parquet files holding the folder's rows, each row in exactly one), from a
    listing no compaction changed meanwhile. Raises JobError if compactions keep changing it."""
    for _ in range(LIST_ATTEMPTS):
        before = read_journal(fs, folder)
        listed = storage.list_files(fs, folder, ".parquet")
        after = read_journal(fs, folder)
        if before == after:
            return after, _live(listed, after)
    raise JobError(f"{storage.to_uri(fs, folder)}: compactions kept changing it while it was listed; try again")


def live_files(fs, folder: str) -> list[str]:
    """The Parquet files under folder that hold its rows (sorted paths), compaction-aware."""
    return snapshot(fs, folder)[1]


def read_live(fs, folder: str, read: Callable[[list[str]], T]) -> T:
    """read(live files), from a new listing when a compaction deleted a file while it was read."""
    for attempt in range(LIST_ATTEMPTS):
        journal, files = snapshot(fs, folder)
        try:
            return read(files)
        except (JobError, FileNotFoundError):
            if attempt == LIST_ATTEMPTS - 1 or read_journal(fs, folder) == journal:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- merging


def compaction_steps(out: Output, folder: str, final: bool = False) -> Iterator[str]:
    """Compacts OUT/folder, yielding a description after each durable step (for tests that kill
    the process between any two). First finishes or abandons an interrupted compaction. Then
    merges the files under SMALL_ROWS rows into files of at most MAX_ROWS rows: when they hold
    SMALL_ROWS rows or number PILE_FILES, or, with final (a job's end), whenever there are two."""
    path = out.path(folder)
    journal = read_journal(out.fs, path)
    if journal and journal["state"] != "done":
        yield from _recover(out.fs, path, journal)
    seq = journal["seq"] if journal else 0
    for group in _groups(out.fs, path, final):
        seq += 1
        yield from _merge(out.fs, path, seq, group)


def _recover(fs, folder: str, journal: dict[str, Any]) -> Iterator[str]:
    names = {posixpath.basename(p) for p in storage.list_files(fs, folder, ".parquet")}
    if journal["output"] in names:
        yield from _delete_inputs(fs, folder, journal)
    else:  # killed before its output was in place: its inputs stay the rows
        for p in storage.retry(fs.ls, folder, detail=False):  # a local write's temporary file
            if posixpath.basename(p).startswith(journal["output"] + ".tmp-"):
                _delete(fs, p)
        _write_journal(fs, folder, dict(seq=journal["seq"], state="done"))
        yield f"abandoned compaction {journal['seq']} (its output was never written)"


def _groups(fs, folder: str, final: bool) -> list[list[tuple[str, int, Any]]]:
    """Small files as (path, rows, Arrow schema), in groups of at most MAX_ROWS rows to merge."""
    small = []
    for p in storage.list_files(fs, folder, ".parquet"):
        meta = storage.read_parquet_metadata(fs, p)
        if meta.num_rows < SMALL_ROWS:
            small.append((p, meta.num_rows, meta.schema.to_arrow_schema()))
    rows = sum(n for _, n, _ in small)
    if len(small) < 2 or not (final or rows >= SMALL_ROWS or len(small) >= PILE_FILES):
        return []
    groups: list[list[tuple[str, int, Any]]] = [[]]
    for f in small:
        if groups[-1] and sum(n for _, n, _ in groups[-1]) + f[1] > MAX_ROWS:
            groups.append([])
        groups[-1].append(f)
    return [g for g in groups if len(g) > 1]


def _merge(fs, folder: str, seq: int, group: list[tuple[str, int, Any]]) -> Iterator[str]:
    inputs = [posixpath.basename(p) for p, _, _ in group]
    digest = hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:16]
    output = f"compacted-{seq:08d}-{digest}.parquet"
    journal = dict(seq=seq, state="writing", inputs=inputs, output=output)
    _write_journal(fs, folder, journal)
    yield f"journal {seq}: writing {output} from {len(inputs)} files"
    storage.write_bytes(fs, storage.join(folder, output), _merged_bytes(fs, group))
    yield f"wrote {output}"
    journal["state"] = "written"
    _write_journal(fs, folder, journal)
    yield f"journal {seq}: written"
    yield from _delete_inputs(fs, folder, journal)


def _merged_bytes(fs, group: list[tuple[str, int, Any]]) -> bytes:
    """The group's rows in one Parquet file (files in the given order), columns unified as
    pyarrow's permissive promotion does (a column some files lack is null in their rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.unify_schemas([s for _, _, s in group], promote_options="permissive")
    buf, pending, held = io.BytesIO(), [], 0
    with pq.ParquetWriter(buf, schema) as writer:
        for p, _, _ in group:
            t = storage.read_parquet(fs, p)
            pending.append(pa.table([t.column(f.name).cast(f.type) if f.name in t.column_names
                                     else pa.nulls(t.num_rows, f.type) for f in schema], schema=schema))
            held += t.num_rows
            if held >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                pending, held = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def _delete_inputs(fs, folder: str, journal: dict[str, Any]) -> Iterator[str]:
    for name in journal["inputs"]:
        _delete(fs, storage.join(folder, name))
        yield f"deleted {name}"
    # a delete that did not take (a stale cache, a zombie writer) would make the input live again
    left = set(journal["inputs"]) & {posixpath.basename(p) for p in storage.list_files(fs, folder, ".parquet")}
    if left:
        raise JobError(f"{storage.to_uri(fs, folder)}: {sorted(left)[0]} was deleted but is still listed")
    _write_journal(fs, folder, dict(seq=journal["seq"], state="done"))
    yield f"journal {journal['seq']}: done"


def _delete(fs, path: str) -> None:
    """Deletes one file; one already gone is fine (no exists() first: s3fs may answer it from a
    stale listing cache, and a kept input would then be read as well as the merged file)."""
    try:
        storage.retry(fs.rm_file, path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(posixpath.dirname(path))


def _write_journal(fs, folder: str, journal: dict[str, Any]) -> None:
    storage.write_bytes(fs, storage.join(folder, JOURNAL), json.dumps(journal).encode())


# ----------------------------------------------------------------------------- running it

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(out: Output, folder: str) -> threading.Lock:
    """One lock per OUT folder in this process: the job's last compaction waits for the
    background one. (Two processes writing one OUT are not supported, compaction or not.)"""
    with _locks_guard:
        return _locks.setdefault(out.uri_of(folder), threading.Lock())


def compact(out: Output, final: bool = True, folders: tuple[str, ...] = FOLDERS) -> None:
    """Runs compaction_steps to the end for each folder (see there). Raises JobError or OSError
    when storage fails; nothing is lost then, and the next compaction takes it up."""
    for folder in folders:
        with _lock(out, folder):
            for _ in compaction_steps(out, folder, final):
                pass


def compact_at_end(out: Output) -> None:
    """A job's last compaction: every small file merged. A storage failure is reported on stderr,
    not raised: the rows are all recorded either way."""
    try:
        compact(out, final=True)
    except (JobError, OSError) as exc:
        print(f"warning: compacting {out.uri}'s manifest and errors failed ({exc}); their rows are all "
              f"recorded, in more files; the next run compacts them", file=sys.stderr)


class Compactor:
    """Compacts OUT/manifest or OUT/errors in a background thread when the parts written since
    the last look may have piled up (SMALL_ROWS rows or PILE_FILES parts), so that the recorder
    never waits for a merge. Call `wrote` after each part."""

    def __init__(self, out: Output):
        self.out = out
        self.since = {folder: [0, 0] for folder in FOLDERS}  # parts, rows written since the last look
        self.thread: threading.Thread | None = None

    def wrote(self, folder: str, rows: int) -> None:
        since = self.since[folder]
        since[0] += 1
        since[1] += rows
        if (since[0] >= PILE_FILES or since[1] >= SMALL_ROWS) and not (self.thread and self.thread.is_alive()):
            self.since[folder] = [0, 0]
            self.thread = threading.Thread(target=self._run, args=(folder,), name=f"compact-{folder}")
            self.thread.start()

    def _run(self, folder: str) -> None:
        try:
            compact(self.out, final=False, folders=(folder,))
        except (JobError, OSError) as exc:
            print(f"warning: compacting {self.out.uri_of(folder)} failed ({exc}); the job goes on, and "
                  f"a later compaction takes it up", file=sys.stderr)
