"""Planning a generation job: the prompt table read and checked, each image's id and seed
derived, rows with problems turned into errors, and the images cut into batches of one shape.

Planning works column by column (pyarrow.compute and numpy): no Python object is made per row,
except for the rows that become errors (their message) and, with a blocklist, each row's prompts.
The driver holds about 40 bytes per image plus the table's planning columns (no carried column).
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdbatch import storage
from sdbatch.errors import JobError

DEFAULTS = dict(steps=25, cfg_scale=7.5, sampler="dpmpp_2m_karras", width=512, height=512, seed=0)
DEFAULT_STRENGTH = 0.8

# Table columns the job reads, and what their Parquet type must be.
COLUMN_KINDS = {
    "prompt": "string", "id": "string or integer", "negative_prompt": "string", "seed": "integer",
    "steps": "integer", "cfg_scale": "number", "sampler": "string", "width": "integer",
    "height": "integer", "init_image": "string", "strength": "number", "num_images": "integer",
}
# Columns the manifest or error files add; a table may not carry columns of these names.
RESERVED = ("image", "latent", "sha256", "model_hash", "seconds", "worker", "error", "row")
PLAN_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
                "width", "height", "init_image", "strength")
# Bounds of plan-time values. Seeds are stored in the manifest as int64 (torch's generators take
# any seed below 2**64, so the manifest is the tighter bound). num_images and the plan's total
# bound the driver's memory (about 40 bytes per planned image, and the work each run writes);
# sides bound a latent's size.
MAX_SEED = 2**63 - 1
MAX_NUM_IMAGES = 100_000
MAX_PLAN_IMAGES = 20_000_000
MAX_SIDE = 16_384


# ----------------------------------------------------------------------------- reading the table


def table_files(uri: str, what: str = "prompt table"):
    """(filesystem, sorted Parquet files) for a file, a folder (searched recursively) or a glob.
    Raises JobError, calling the input `what`, when it does not exist or holds no Parquet file."""
    fs, path = storage.url_to_fs(uri)
    if any(c in path for c in "*?["):
        files = [p for p in storage.retry(fs.glob, path) if storage.retry(fs.isfile, p)]
    elif storage.retry(fs.isdir, path):
        files = [p for p in storage.retry(fs.find, path) if p.endswith(".parquet")]
    elif storage.exists(fs, path):
        files = [path]
    else:
        where = "" if "://" in uri or os.path.isabs(uri) else f" (relative to {os.getcwd()}, where the job runs)"
        raise JobError(f"{what} {uri} does not exist{where}")
    files = sorted(p for p in files if not os.path.basename(p).startswith((".", "_")))
    if not files:
        raise JobError(f"no Parquet files found at {uri}")
    return fs, files


def type_ok(kind: str, t) -> bool:
    """Whether Parquet type `t` holds `kind`: "string", "string or integer", "integer" or "number"
    (dictionary-encoded and all-null columns included)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    string = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    return pa.types.is_null(t) or {
        "string": string,
        "string or integer": string or pa.types.is_integer(t),
        "integer": pa.types.is_integer(t),
        "number": pa.types.is_integer(t) or pa.types.is_floating(t),
    }[kind]


def check_schema(schema, source: str) -> None:
    """Fails, naming the column, on a missing prompt column or a column of the wrong type."""
    if "prompt" not in schema.names:
        raise JobError(f"{source}: the prompt table has no 'prompt' column "
                       f"(its columns: {', '.join(schema.names) or 'none'})")
    for name in schema.names:
        kind = COLUMN_KINDS.get(name)
        if kind and not type_ok(kind, schema.field(name).type):
            raise JobError(f"{source}: column '{name}' has type {schema.field(name).type}; "
                           f"it must be {kind}")
        if name in RESERVED:
            raise JobError(f"{source}: column '{name}' clashes with a column sdbatch writes to "
                           f"the manifest; rename it")


def read_table(uri: str):
    """The whole prompt table (files in sorted order), after checking every file's schema."""
    import pyarrow as pa

    fs, files = table_files(uri)
    for path in files:
        check_schema(storage.read_parquet_schema(fs, path), storage.to_uri(fs, path))
    tables = [storage.read_parquet(fs, path) for path in files]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise JobError(f"the files of {uri} have conflicting column types: {exc}") from exc


class Source:
    """A prompt table's Parquet files (a file, folder or glob, as `table_files`): the schemas checked
    and unified at once, columns read for all rows (`read`), and whole rows read back by position
    (`take`, for error records and carried columns), so that no caller holds the whole table.
    Raises JobError naming a bad file, a bad column or conflicting column types."""

    def __init__(self, uri: str):
        import pyarrow as pa

        self.uri = uri
        self.fs, self.files = table_files(uri)
        metas = [storage.read_parquet_metadata(self.fs, p) for p in self.files]
        schemas = [m.schema.to_arrow_schema() for m in metas]
        for path, schema in zip(self.files, schemas):
            check_schema(schema, storage.to_uri(self.fs, path))
        try:
            self.schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise JobError(f"the files of {uri} have conflicting column types: {exc}") from exc
        self.file_names = [set(s.names) for s in schemas]
        self.starts = np.cumsum([0] + [m.num_rows for m in metas])  # first row of each file
        self.group_starts = [np.cumsum([0] + [m.row_group(g).num_rows for g in range(m.num_row_groups)])
                             for m in metas]

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def _conform(self, table, columns: list[str], num_rows: int):
        """`table`'s `columns` in the unified types; a column the file lacks is all null."""
        import pyarrow as pa

        fields = [self.schema.field(c) for c in columns]
        return pa.Table.from_arrays([table.column(f.name).cast(f.type) if f.name in table.column_names
                                     else pa.nulls(num_rows, f.type) for f in fields], schema=pa.schema(fields))

    def read(self, columns: list[str]):
        """The given columns (those the table has) of every row, files in sorted order."""
        import pyarrow as pa

        columns = [c for c in columns if c in self.schema.names]
        parts = [self._conform(storage.read_parquet_columns(self.fs, path, [c for c in columns if c in names]), columns,
                               int(self.starts[f + 1] - self.starts[f]))
                 for f, (path, names) in enumerate(zip(self.files, self.file_names))]
        return pa.concat_tables(parts)

    def take(self, rows, columns: list[str] | None = None):
        """Rows by position (int64, any order, repeats allowed) with the given columns (default:
        all), reading only the row groups that hold them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = self.schema.names if columns is None else columns
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        file_of = np.searchsorted(self.starts, ordered, "right") - 1
        parts = []
        for f in np.unique(file_of):
            local = ordered[file_of == f] - self.starts[f]
            bounds = self.group_starts[f]
            group_of = np.searchsorted(bounds, local, "right") - 1
            groups = np.unique(group_of)
            sizes = bounds[groups + 1] - bounds[groups]
            first_in_read = np.cumsum(sizes) - sizes  # where each read group starts in the read table
            where = first_in_read[np.searchsorted(groups, group_of)] + local - bounds[group_of]

            def read(path=self.files[f], names=self.file_names[f]):
                with self.fs.open(path, "rb") as fh:
                    return pq.ParquetFile(fh, pre_buffer=False).read_row_groups(
                        groups.tolist(), columns=[c for c in columns if c in names], use_threads=False)

            read_rows = storage.retry(read)
            parts.append(self._conform(read_rows.take(where) if read_rows.num_columns else read_rows,
                                       columns, len(where)))
        if not parts:
            return self._conform(pa.table({}), columns, 0)
        return pa.concat_tables(parts).take(np.argsort(order, kind="stable"))


# ----------------------------------------------------------------------------- the plan

# Python's str.isspace characters: a prompt of only these is empty (as `not prompt.strip()`).
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
CHECK_CHUNK = 1 << 20  # rows checked at once: bounds the check's temporary arrays


def derive_seed(base_seed: int, image_id: str) -> int:
    """The seed of an image whose row has no seed: sha256("<--seed>:<id>"), first 4 bytes."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()[:4], "big")


def derive_seeds(base_seed: int, ids) -> np.ndarray:
    """`derive_seed` of many ids (a pyarrow string array) -> int64 (n,); hashlib in C loops."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keyed = pc.binary_join_element_wise(f"{base_seed}:", ids, "").cast(pa.binary()).to_pylist()
    digests = b"".join(map(operator.methodcaller("digest"), map(hashlib.sha256, keyed)))
    return np.frombuffer(digests, ">u4").reshape(-1, 8)[:, 0].astype(np.int64)


@dataclass
class Plan:
    """A table turned into images and errors.

    images: pyarrow Table (id string, seed int64, row int64), one row per image, in table order
      (a row's images in order j = 0, 1, ...). row: the image's row's position in the table.
      seed: the row's seed + j, or null where it is derived from the id (`derive_seed(base_seed,
      id)`, made by `columns` for the images asked for: hashing is the plan's slowest step).
    errors: pyarrow Table (id, error, row), in table order, then the blocklist's.
    values: per table row, each image setting (prompt, negative_prompt, steps, cfg_scale, sampler,
      width, height, init_image, strength) with the command's defaults filled in: a pyarrow array
      (num_rows,) when the table has the column, else the one value of every row.
    shape: int32 (num_rows,), the rank of each planned row's `shape_key` among `shapes`; -1 else.
    """

    images: Any
    errors: Any
    values: dict[str, Any]
    shape: np.ndarray
    shapes: list[tuple]
    num_rows: int
    base_seed: int

    @property
    def total(self) -> int:
        return self.images.num_rows + self.errors.num_rows

    def columns(self, positions: np.ndarray):
        """The images at `positions` (int64 indices into `images`) as a pyarrow Table of
        PLAN_COLUMNS + row, in the manifest's types."""
        import pyarrow as pa
        import pyarrow.compute as pc

        images = self.images.take(positions)
        rows = images.column("row")
        types = dict(prompt=pa.string(), negative_prompt=pa.string(), steps=pa.int64(), cfg_scale=pa.float64(),
                     sampler=pa.string(), width=pa.int64(), height=pa.int64(), init_image=pa.string(),
                     strength=pa.float64())
        cols = {}
        for name in PLAN_COLUMNS:
            if name == "id":
                cols[name] = images.column(name)
            elif name == "seed":
                cols[name] = images.column(name).combine_chunks()
                if cols[name].null_count:
                    derived = np.asarray(pc.is_null(cols[name]))
                    seeds = cols[name].fill_null(0).to_numpy(zero_copy_only=False).copy()
                    seeds[derived] = derive_seeds(self.base_seed, images.column("id").filter(pa.array(derived)))
                    cols[name] = pa.array(seeds)
            elif isinstance(self.values[name], (pa.Array, pa.ChunkedArray)):
                cols[name] = self.values[name].take(rows)
            else:
                cols[name] = pa.repeat(pa.scalar(self.values[name], types[name]), len(positions))
        cols["row"] = rows
        return pa.table(cols)

    def rows(self, positions: np.ndarray | None = None) -> list[dict[str, Any]]:
        """`columns` as one dict per image (default: every image): for small plans only."""
        return self.columns(np.arange(self.images.num_rows) if positions is None else positions).to_pylist()


def _plain(column):
    """A column as one array, dictionary-decoded."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _int64s(arr) -> tuple[np.ndarray, np.ndarray]:
    """(values as int64, nulls as 0; whether valid). Integers past int64 wrap to negative values,
    which every check below flags, so such rows reach `_row_problems` with their own value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = np.asarray(pc.is_valid(arr))
    return pc.cast(arr, pa.int64(), safe=False).fill_null(0).to_numpy(), valid


def _filled(r: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A row (dict of its COLUMN_KINDS values) with the command's defaults filled in."""
    r = {name: r.get(name) for name in COLUMN_KINDS}
    for name in ("steps", "cfg_scale", "sampler", "width", "height"):
        if r[name] is None:
            r[name] = settings[name]
    r["cfg_scale"] = float(r["cfg_scale"])
    r["negative_prompt"] = r["negative_prompt"] or ""
    r["strength"] = float(DEFAULT_STRENGTH if r["strength"] is None else r["strength"])
    return r


def _image_values(raw: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Plan.values from the table's (plain) columns: defaults filled in, manifest types."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kinds = dict(steps=pa.int64(), cfg_scale=pa.float64(), sampler=pa.string(), width=pa.int64(), height=pa.int64())
    values: dict[str, Any] = dict(prompt=pc.cast(raw["prompt"], pa.string()))
    for name, kind in kinds.items():
        default = float(settings[name]) if name == "cfg_scale" else settings[name]
        values[name] = (pc.cast(raw[name], kind, safe=False).fill_null(default) if name in raw else default)
    values["negative_prompt"] = (pc.cast(raw["negative_prompt"], pa.string()).fill_null("")
                                 if "negative_prompt" in raw else "")
    values["init_image"] = pc.cast(raw["init_image"], pa.string()) if "init_image" in raw else None
    values["strength"] = (pc.cast(raw["strength"], pa.float64(), safe=False).fill_null(DEFAULT_STRENGTH)
                          if "strength" in raw else DEFAULT_STRENGTH)
    return values


def _maybe_bad(values: dict[str, Any], raw: dict[str, Any], lo: int, hi: int, samplers) -> np.ndarray:
    """bool (hi - lo,): rows [lo, hi) that may have a problem; every row `_row_problems` faults is
    among them (the messages are then made by `_row_problems` itself)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def get(name):
        v = values[name]
        return v.slice(lo, hi - lo) if isinstance(v, pa.Array) else v

    def ints(name):
        v = get(name)
        return _int64s(v)[0] if isinstance(v, pa.Array) else v

    prompt = get("prompt")
    empty = pc.equal(pc.utf8_length(pc.utf8_trim(prompt, WHITESPACE)), 0).fill_null(True)
    bad = np.asarray(empty).copy()
    for name in ("width", "height"):
        side = ints(name)
        bad |= (side < 8) | (side % 8 != 0) | (side > MAX_SIDE)
    steps = ints("steps")
    bad |= (steps < 1) | (steps > 1000)
    sampler = get("sampler")
    bad |= (~np.asarray(pc.is_in(sampler, value_set=pa.array(list(samplers)))) if isinstance(sampler, pa.Array)
            else sampler not in samplers)
    cfg = get("cfg_scale")
    bad |= ~np.isfinite(cfg.to_numpy() if isinstance(cfg, pa.Array) else cfg)
    if "init_image" in raw:
        init = np.asarray(pc.is_valid(get("init_image")))
        strength = get("strength")
        strength = strength.to_numpy() if isinstance(strength, pa.Array) else np.float64(strength)
        bad |= init & ~((strength > 0) & (strength <= 1))
        bad |= init & (steps * strength < 1)
    k, k_valid = _int64s(raw["num_images"].slice(lo, hi - lo)) if "num_images" in raw else (0, False)
    bad |= k_valid & ((k < 1) | (k > MAX_NUM_IMAGES))
    if "seed" in raw:
        seed, seed_valid = _int64s(raw["seed"].slice(lo, hi - lo))
        bad |= seed_valid & (seed < 0)
        bad |= seed_valid & k_valid & (seed > MAX_SEED - (np.clip(k, 1, MAX_NUM_IMAGES) - 1))
    return bad


def _row_problems(r: dict[str, Any], samplers) -> list[str]:
    problems = []
    if r["prompt"] is None:
        problems.append("prompt is null")
    elif not r["prompt"].strip():
        problems.append("prompt is empty")
    for name in ("width", "height"):
        if r[name] < 8 or r[name] % 8:
            problems.append(f"{name} {r[name]} is not a positive multiple of 8")
        elif r[name] > MAX_SIDE:
            problems.append(f"{name} {r[name]} is larger than {MAX_SIDE}")
    if not 1 <= r["steps"] <= 1000:
        problems.append(f"steps {r['steps']} is outside [1, 1000]")
    if r["sampler"] not in samplers:
        problems.append(f"sampler {r['sampler']!r} is unknown (known: {', '.join(samplers)})")
    if not math.isfinite(r["cfg_scale"]):
        problems.append(f"cfg_scale {r['cfg_scale']} is not a finite number")
    if r["init_image"] is not None and not 0 < r["strength"] <= 1:
        problems.append(f"strength {r['strength']} is outside (0, 1]")
    elif r["init_image"] is not None and int(r["steps"] * r["strength"]) < 1:
        problems.append(f"strength {r['strength']} with {r['steps']} steps leaves no step to run")
    if r["num_images"] is not None and r["num_images"] < 1:
        problems.append(f"num_images {r['num_images']} is less than 1")
    if r["num_images"] is not None and r["num_images"] > MAX_NUM_IMAGES:
        problems.append(f"num_images {r['num_images']} is more than {MAX_NUM_IMAGES} (one row's limit)")
    if r["seed"] is not None and not 0 <= r["seed"] <= MAX_SEED:
        problems.append(f"seed {r['seed']} is outside [0, 2^63)")
    elif r["seed"] is not None and r["num_images"] is not None and r["seed"] + r["num_images"] - 1 > MAX_SEED:
        problems.append(f"seed {r['seed']} + num_images {r['num_images']} - 1 is past 2^63 - 1, the largest seed "
                        f"the manifest can hold (seeds of a row's images are seed, seed+1, ...)")
    return problems


def check_settings(settings: dict[str, Any]) -> None:
    """The command's own defaults (--steps, --cfg-scale, --sampler, --width, --height), checked as
    a row's are, before anything starts: a bad option would otherwise turn every row that uses
    it into a (final) row error. Raises JobError naming the options."""
    from sdbatch.model.samplers import SAMPLERS

    row = dict(prompt="-", init_image=None, strength=DEFAULT_STRENGTH, num_images=None, seed=None,
               **{k: settings[k] for k in ("steps", "cfg_scale", "sampler", "width", "height")})
    problems = _row_problems(row, SAMPLERS)
    if problems:
        raise JobError("bad options: " + "; ".join(f"--{p.replace('cfg_scale', 'cfg-scale')}" for p in problems))


def _first_appearances(codes: np.ndarray) -> np.ndarray:
    """bool: whether each dictionary code (pc.dictionary_encode numbers values in order of first
    appearance) appears here for the first time."""
    first = np.ones(len(codes), dtype=bool)
    if len(codes) > 1:
        first[1:] = codes[1:] > np.maximum.accumulate(codes)[:-1]
    return first


def _shape_ranks(values: dict[str, Any], rows: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
    """(int32 rank of each row's `shape_key` among the distinct keys sorted, the keys sorted), for
    the given rows: each column dictionary-encoded, the codes combined one column at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def column(name):
        v = values[name]
        return v.take(rows) if isinstance(v, pa.Array) else pa.repeat(pa.scalar(v), len(rows))

    init = (pc.is_valid(values["init_image"].take(rows)) if isinstance(values["init_image"], pa.Array)
            else pa.repeat(pa.scalar(False), len(rows)))
    # -0.0 + 0.0 is 0.0: Python's tuples find them equal, a hash would not
    parts = [column("width"), column("height"), column("steps"), column("sampler"),
             pc.add(column("cfg_scale"), 0.0), init, pc.add(pc.if_else(init, column("strength"), 0.0), 0.0)]
    key = np.zeros(len(rows), dtype=np.int64)
    for part in parts:
        encoded = pc.dictionary_encode(part)
        combined = key * len(encoded.dictionary) + encoded.indices.to_numpy().astype(np.int64)
        key = pc.dictionary_encode(pa.array(combined)).indices.to_numpy().astype(np.int64)
    firsts = np.flatnonzero(_first_appearances(key))
    keys = list(zip(*(p.take(firsts).to_pylist() for p in parts)))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rank = np.empty(len(keys), dtype=np.int32)
    rank[order] = np.arange(len(keys), dtype=np.int32)
    return rank[key], [keys[i] for i in order]


def make_plan(table, settings: dict[str, Any], blocklist=None) -> Plan:
    """Turns table rows into images to generate (or errors), with ids and seeds.

    - id: the row's `id` (integers written in decimal); without an `id` column, the row's
      position in the table as 8 digits (`00000000`, `00000001`, ...; files in sorted order).
    - a row with `num_images` k gives k images, ids `<id>-0` ... `<id>-<k-1>`.
    - seed: the row's `seed` (plus j for the j-th of its num_images); without one,
      `derive_seed(--seed, image id)`.
    Per-row values override the command's; rows with problems become errors, and so do images
    whose id an earlier image has, then (with a `blocklist.Blocklist`) images whose prompt or
    negative prompt a rule matches. `table` needs only the COLUMN_KINDS columns. Raises JobError
    when the table asks for more than MAX_PLAN_IMAGES images.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from sdbatch.model.samplers import SAMPLERS

    n = table.num_rows
    raw = {name: _plain(table.column(name)) for name in COLUMN_KINDS if name in table.column_names}
    k, k_valid = _int64s(raw["num_images"]) if "num_images" in raw else (np.zeros(n, np.int64), np.zeros(n, bool))
    counted = k_valid & (k > 0) & (k <= MAX_NUM_IMAGES)
    planned = int(np.where(counted, k, 1).sum())
    if planned > MAX_PLAN_IMAGES:
        raise JobError(f"the table asks for {planned} images; one job plans at most {MAX_PLAN_IMAGES} "
                       f"(split the table into several jobs)")
    positions = pa.array(np.arange(n, dtype=np.int64))
    if "id" in raw:
        base, id_null = pc.cast(raw["id"], pa.string()), np.asarray(pc.is_null(raw["id"]))
    else:
        base, id_null = pc.utf8_lpad(pc.cast(positions, pa.string()), 8, "0"), np.zeros(n, dtype=bool)
    values = _image_values(raw, settings)

    # rows with problems: flagged column-wise, then each flagged row checked as a dict
    maybe = np.concatenate([_maybe_bad(values, raw, lo, min(lo + CHECK_CHUNK, n), SAMPLERS)
                            for lo in range(0, n, CHECK_CHUNK)] or [np.zeros(0, bool)])
    candidates = np.flatnonzero(maybe & ~id_null)
    bad = np.zeros(n, dtype=bool)
    errors: list[tuple[int, str, str]] = [(i, f"{i:08d}", f"Row {i}: id is null.") for i in np.flatnonzero(id_null).tolist()]
    checked = table.select(list(raw)).take(candidates).to_pylist()
    for i, r in zip(candidates.tolist(), checked):
        problems = _row_problems(_filled(r, settings), SAMPLERS)
        if problems:
            bad[i] = True
            row_id = base[i].as_py()
            errors.append((i, row_id, f"Row {i} (id {row_id!r}): {'; '.join(problems)}."))

    # images: a row's num_images expanded, ids <id>-j
    rows = np.flatnonzero(~id_null & ~bad)
    count = np.where(k_valid[rows], k[rows], 1)
    image_row = np.repeat(rows, count)
    j = np.arange(len(image_row)) - np.repeat(np.cumsum(count) - count, count)
    # every row planned, one image each: image_row is 0..n-1, the ids are the rows' own
    ids = base if len(rows) == len(image_row) == n else base.take(image_row)
    suffixed = np.repeat(k_valid[rows], count)
    if suffixed.any():
        ids = pc.if_else(suffixed, pc.binary_join_element_wise(ids, pc.cast(pa.array(j), pa.string()), "-"), ids)

    # an id already used by an earlier image: an error naming that image's row
    codes = pc.dictionary_encode(ids).indices.to_numpy()
    first = _first_appearances(codes)
    firsts = np.flatnonzero(first)
    dups = np.flatnonzero(~first)
    errors += [(i, image_id, f"Row {i}: id {image_id!r} is already used by row {f}.") for i, image_id, f in
               zip(image_row[dups].tolist(), ids.take(dups).to_pylist(), image_row[firsts[codes[dups]]].tolist())]
    if len(dups):
        image_row, j, ids = image_row[first], j[first], ids.filter(pa.array(first))

    seeds = np.zeros(len(image_row), dtype=np.int64)
    given = np.zeros(len(image_row), dtype=bool)
    if "seed" in raw:
        seed, seed_valid = _int64s(raw["seed"])
        given = seed_valid[image_row]
        seeds[given] = seed[image_row[given]] + j[given]

    errors.sort(key=lambda e: e[0])  # stable: a row's images stay in order
    if blocklist is not None and len(image_row):
        image_row, ids, seeds, given, blocked = _block(values, image_row, ids, seeds, given, blocklist)
        errors += blocked
    error_table = pa.table({"id": pa.array([e[1] for e in errors], pa.string()),
                            "error": pa.array([e[2] for e in errors], pa.string()),
                            "row": pa.array([e[0] for e in errors], pa.int64())})
    images = pa.table({"id": ids, "seed": pa.array(seeds, mask=~given), "row": pa.array(image_row, pa.int64())})
    shape = np.full(n, -1, dtype=np.int32)
    planned_rows = _distinct_sorted(image_row)
    ranks, shapes = _shape_ranks(values, planned_rows) if len(planned_rows) else (np.zeros(0, np.int32), [])
    shape[planned_rows] = ranks
    return Plan(images=images, errors=error_table, values=values, shape=shape, shapes=shapes, num_rows=n,
                base_seed=settings["seed"])


def _distinct_sorted(values: np.ndarray) -> np.ndarray:
    """np.unique of an array already sorted (numpy's own hashes, which is slower)."""
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _block(values, image_row, ids, seeds, given, blocklist):
    """Images whose row's prompt or negative prompt a blocklist rule matches, moved to errors
    (naming the rule). Checks each row once (Python's re: a rule is a Python pattern)."""
    import pyarrow as pa

    rows = _distinct_sorted(image_row)
    prompts = values["prompt"].take(rows).to_pylist()
    negative = values["negative_prompt"]
    negatives = negative.take(rows).to_pylist() if isinstance(negative, pa.Array) else [negative] * len(rows)
    why = [blocklist.check(p, q) for p, q in zip(prompts, negatives)]
    row_blocked = np.array([w is not None for w in why], dtype=bool)
    blocked = row_blocked[np.searchsorted(rows, image_row)]
    reason = {int(r): w for r, w in zip(rows, why) if w is not None}
    at = np.flatnonzero(blocked)
    errors = [(i, image_id, f"Row {i} (id {image_id!r}): {reason[i]}.")
              for i, image_id in zip(image_row[at].tolist(), ids.take(at).to_pylist())]
    keep = ~blocked
    return image_row[keep], ids.filter(pa.array(keep)), seeds[keep], given[keep], errors


def shape_key(r: dict[str, Any]) -> tuple:
    """What a batch's images share: (width, height, steps, sampler, cfg_scale, init, strength)."""
    init = r["init_image"] is not None
    return (r["width"], r["height"], r["steps"], r["sampler"], r["cfg_scale"], init,
            r["strength"] if init else 0.0)


@dataclass
class Batches:
    """order: int64 positions in Plan.images, in batch order; starts: int64 (batches + 1,), where
    each batch starts in `order`, then len(order). skip (with `select_work`): bool per entry of
    `order`, the image is already recorded (generated with its batch, but not written again)."""

    order: np.ndarray
    starts: np.ndarray
    skip: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)


def make_batches(plan: Plan, batch_size: int) -> Batches:
    """The plan's images cut into batches of one shape, in table order within each shape.

    Batches are made from the whole plan, before anything is skipped as done, and a batch is
    always generated whole: an image's batch mates (which can change its last bit on CPU and
    GPU alike) are then the same in every run, so a lost image is regenerated byte for byte.
    Rows appended to the table only join the last batch of their shape.
    """
    rank = plan.shape[plan.images.column("row").to_numpy()]
    order = np.argsort(rank, kind="stable")
    ranked = rank[order]
    n = len(order)
    index = np.arange(n)
    group_start = np.maximum.accumulate(np.where(np.r_[True, ranked[1:] != ranked[:-1]], index, 0)) if n else index
    starts = np.flatnonzero((index - group_start) % batch_size == 0)
    return Batches(order=order.astype(np.int64), starts=np.r_[starts, n].astype(np.int64))


def select_work(plan: Plan, batches: Batches, recorded) -> Batches:
    """The batches with an image not in `recorded` (a pyarrow string array of the ids OUT holds),
    whole, with `skip` marking their images already recorded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = plan.images.column("id")
    done = (np.asarray(pc.is_in(ids, value_set=pc.cast(recorded, pa.string())))
            if len(recorded) else np.zeros(len(ids), dtype=bool))[batches.order]
    batch_of = np.repeat(np.arange(len(batches)), batches.sizes)
    kept = np.bincount(batch_of, weights=~done, minlength=len(batches)) > 0
    keep = kept[batch_of]
    return Batches(order=batches.order[keep], starts=np.r_[0, np.cumsum(batches.sizes[kept])].astype(np.int64),
                   skip=done[keep])
