"""Planning a generation job: the prompt table read and checked, each image's id and seed
derived, rows with problems turned into errors, and the images cut into batches of one shape."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

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
# bound the driver's memory (about 1 KB per planned image); sides bound a latent's size.
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


# ----------------------------------------------------------------------------- the plan


def derive_seed(base_seed: int, image_id: str) -> int:
    """The seed of an image whose row has no seed: sha256("<--seed>:<id>"), first 4 bytes."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()[:4], "big")


@dataclass
class Plan:
    rows: list[dict[str, Any]] = field(default_factory=list)      # PLAN_COLUMNS + "row"
    errors: list[dict[str, Any]] = field(default_factory=list)    # id, error, row

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.errors)


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


def make_plan(table, settings: dict[str, Any]) -> Plan:
    """Turns table rows into images to generate (or errors), with ids and seeds.

    - id: the row's `id` (integers written in decimal); without an `id` column, the row's
      position in the table as 8 digits (`00000000`, `00000001`, ...; files in sorted order).
    - a row with `num_images` k gives k images, ids `<id>-0` ... `<id>-<k-1>`.
    - seed: the row's `seed` (plus j for the j-th of its num_images); without one,
      `derive_seed(--seed, image id)`.
    Per-row values override the command's; rows with problems become errors.
    """
    from sdbatch.model.samplers import SAMPLERS

    n = table.num_rows
    cols = {name: table.column(name).to_pylist() if name in table.column_names else [None] * n
            for name in COLUMN_KINDS}
    planned = sum(k if k is not None and 0 < k <= MAX_NUM_IMAGES else 1 for k in cols["num_images"])
    if planned > MAX_PLAN_IMAGES:
        raise JobError(f"the table asks for {planned} images; one job plans at most {MAX_PLAN_IMAGES} "
                       f"(split the table into several jobs)")
    plan, first_row = Plan(), {}
    for i in range(n):
        r = {name: cols[name][i] for name in COLUMN_KINDS}
        base = f"{i:08d}" if "id" not in table.column_names else r["id"]
        if base is None:
            plan.errors.append(dict(id=f"{i:08d}", error=f"Row {i}: id is null.", row=i))
            continue
        base = str(base)
        for name in ("steps", "cfg_scale", "sampler", "width", "height"):
            if r[name] is None:
                r[name] = settings[name]
        r["cfg_scale"] = float(r["cfg_scale"])
        r["negative_prompt"] = r["negative_prompt"] or ""
        r["strength"] = float(DEFAULT_STRENGTH if r["strength"] is None else r["strength"])
        problems = _row_problems(r, SAMPLERS)
        if problems:
            plan.errors.append(dict(id=base, error=f"Row {i} (id {base!r}): {'; '.join(problems)}.", row=i))
            continue
        ids = [base] if r["num_images"] is None else [f"{base}-{j}" for j in range(r["num_images"])]
        for j, image_id in enumerate(ids):
            if image_id in first_row:
                plan.errors.append(dict(id=image_id, row=i, error=(
                    f"Row {i}: id {image_id!r} is already used by row {first_row[image_id]}.")))
                continue
            first_row[image_id] = i
            seed = derive_seed(settings["seed"], image_id) if r["seed"] is None else r["seed"] + j
            plan.rows.append(dict({c: r[c] for c in PLAN_COLUMNS}, id=image_id, seed=seed, row=i))
    return plan


def shape_key(r: dict[str, Any]) -> tuple:
    init = r["init_image"] is not None
    return (r["width"], r["height"], r["steps"], r["sampler"], r["cfg_scale"], init,
            r["strength"] if init else 0.0)


def make_batches(rows: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """The plan's rows cut into batches of one shape, in table order within each shape.

    Batches are made from the whole plan, before anything is skipped as done, and a batch is
    always generated whole: an image's batch mates (which can change its last bit on CPU and
    GPU alike) are then the same in every run, so a lost image is regenerated byte for byte.
    Rows appended to the table only join the last batch of their shape.
    """
    out: list[list[dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: (shape_key(r), r["row"])):
        if not out or len(out[-1]) == batch_size or shape_key(out[-1][0]) != shape_key(r):
            out.append([])
        out[-1].append(r)
    return out
