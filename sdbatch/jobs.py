"""The batch job: a Parquet table of prompts in, a folder of images with a manifest out.

    python -m sdbatch.jobs run PROMPTS --model SRC --output OUT [options]
    python -m sdbatch.jobs status OUT
    python -m sdbatch.jobs metrics ...

`run` works in three steps:
1. Plan, on the driver: read the table (a Parquet file, folder or glob, local or any fsspec
   URI), check its columns, derive each image's id and seed, check each row, and drop the
   ids OUT already records (in its manifest or errors) so a re-run does only what is missing.
2. Generate, on Ray: the rows, sorted by shape so each batch has one size/steps/sampler, go
   through Ray Data's `map_batches` to a pool of `GenerationActor`s (one GPU each, or CPU
   threads split across actors), which write `OUT/images/<id>.png`.
3. Record, on the driver: manifest and error rows are written as Parquet parts named by the
   hash of their ids, so no run ever writes a row twice, and a killed run loses at most the
   rows it had not yet recorded (whose images are then regenerated, byte for byte).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from sdbatch import storage

DEFAULTS = dict(steps=25, cfg_scale=7.5, sampler="dpmpp_2m_karras", width=512, height=512, seed=0)
DEFAULT_STRENGTH = 0.8

# Table columns the job reads, and what their Parquet type must be.
COLUMN_KINDS = {
    "prompt": "string", "id": "string or integer", "negative_prompt": "string", "seed": "integer",
    "steps": "integer", "cfg_scale": "number", "sampler": "string", "width": "integer",
    "height": "integer", "init_image": "string", "strength": "number", "num_images": "integer",
}
# Columns the manifest or error files add; a table may not carry columns of these names.
RESERVED = ("image", "sha256", "model_hash", "seconds", "worker", "error", "row")
PLAN_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
                "width", "height", "init_image", "strength")


class JobError(Exception):
    """A problem with the job's input or output as a whole: reported, nothing started."""


# ----------------------------------------------------------------------------- reading the table


def table_files(uri: str):
    """(filesystem, sorted Parquet files) for a file, a folder (searched recursively) or a glob."""
    fs, path = storage.url_to_fs(uri)
    if any(c in path for c in "*?["):
        files = [p for p in storage.retry(fs.glob, path) if storage.retry(fs.isfile, p)]
    elif storage.retry(fs.isdir, path):
        files = [p for p in storage.retry(fs.find, path) if p.endswith(".parquet")]
    elif storage.exists(fs, path):
        files = [path]
    else:
        raise JobError(f"prompt table {uri} does not exist")
    files = sorted(p for p in files if not os.path.basename(p).startswith((".", "_")))
    if not files:
        raise JobError(f"no Parquet files found at {uri}")
    return fs, files


def _type_ok(kind: str, t) -> bool:
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
        if kind and not _type_ok(kind, schema.field(name).type):
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
    if r["seed"] is not None and not 0 <= r["seed"] < 2**63:
        problems.append(f"seed {r['seed']} is outside [0, 2^63)")
    return problems


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


# ----------------------------------------------------------------------------- the output folder


def _part_name(ids: list[str]) -> str:
    return f"part-{hashlib.sha256(chr(0).join(sorted(ids)).encode()).hexdigest()[:20]}.parquet"


class Output:
    """OUT/: images/, manifest/*.parquet, errors/*.parquet, run.json."""

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

    def write_part(self, folder: str, table) -> None:
        name = _part_name(table.column("id").to_pylist())
        storage.write_parquet(self.fs, self.path(folder, name), table)

    def clear(self) -> None:
        for name in ("images", "manifest", "errors", "run.json"):
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
                self.done.append(dict(plan, **{k: res[k] for k in ("image", "sha256", "model_hash", "seconds", "worker")}))
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
                      ("init_image", s), ("strength", f), ("image", s), ("sha256", s),
                      ("model_hash", s), ("seconds", f), ("worker", s)])


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


# ----------------------------------------------------------------------------- progress


class Progress:
    """`rows done/total | images/s | ETA` on stderr: redrawn on a terminal, a line every 10 s
    in a log (as under `ray job submit`)."""

    def __init__(self, total: int, done: int, stream=None):
        self.total, self.done, self.errors, self.new = total, done, 0, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.show(force=True)

    def update(self, ok: int, err: int) -> None:
        self.done += ok + err
        self.new += ok
        self.errors += err
        self.show()

    def show(self, force: bool = False, end: str = "") -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 10):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.new / elapsed
        left = self.total - self.done
        eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        line = (f"rows {self.done}/{self.total} ({self.errors} errors) | "
                f"{rate:.2f} images/s | ETA {eta}")
        self.stream.write(("\r" + line + end) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.show(force=True, end="\n")


# ----------------------------------------------------------------------------- running on Ray


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("sdbatch", "torch", "ray", "pyarrow", "numpy", "pillow", "fsspec", "s3fs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connected to Ray for the block: the one already initialised, RAY_ADDRESS / --address, or a
    local Ray started for the block and shut down after it."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", logging_level="WARNING", log_to_driver=True)
    try:
        yield
    finally:
        if not address:
            ray.shutdown()


@dataclass
class Pool:
    min_size: int
    max_size: int | None  # None: no bound known, Ray Data grows the pool as the cluster grows
    num_gpus: float
    num_cpus: float
    threads: int


def actor_pool(workers: str | None, gpus_per_worker: float | None) -> Pool:
    """Actor count and resources from the cluster: one actor per `gpus_per_worker` GPUs, or on
    a cluster without GPUs, CPU actors whose torch threads add up to the CPUs (never more).
    `--workers auto` gives an autoscaling pool from 1 to what the cluster has or can add."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), res.get("GPU", 0)
    can_add = _max_cluster_resources()
    max_gpus = max(gpus, (can_add or {}).get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if max_gpus else 0.0
    if gpus_per_worker > 0:
        if not max_gpus and can_add is not None:
            raise JobError(f"--gpus-per-worker {gpus_per_worker:g} but the cluster has no GPUs")
        now = max(1, int(gpus // gpus_per_worker))
        threads = max(1, min(4, cpus // now))
        if workers == "auto":
            most = None if can_add is None else max(1, int(max_gpus // gpus_per_worker))
            return Pool(1, most, gpus_per_worker, 1, threads)
        n = int(workers) if workers else now
        return Pool(n, n, gpus_per_worker, 1, threads)
    if workers == "auto":
        threads = min(cpus, 4)
        most = max(1, max(cpus, int((can_add or {}).get("CPU", 0))) // threads)
        return Pool(1, most, 0, threads, threads)
    n = int(workers or 1)
    if n > cpus:
        print(f"note: {n} CPU workers on {cpus} CPUs; using {cpus}", file=sys.stderr)
        n = cpus
    threads = max(1, cpus // n)
    return Pool(n, n, 0, threads, threads)


def _max_cluster_resources() -> dict[str, float] | None:
    """What an autoscaling cluster can grow to: {} without an autoscaler, None if one runs
    but its limits are unknown.

    KubeRay reports its node types to the GCS. Ray's cluster launcher (`ray up`) doesn't, but
    leaves them in ~/ray_bootstrap_config.yaml on the head, where `ray job submit` runs us.
    """
    import ray._private.state
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # not every Ray deployment reports a cluster config
        limits = None
    if limits:
        return limits
    bootstrap = os.path.expanduser("~/ray_bootstrap_config.yaml")
    if os.path.exists(bootstrap):
        import yaml

        with open(bootstrap) as f:
            config = yaml.safe_load(f)
        totals: dict[str, float] = {}
        for name, node_type in config["available_node_types"].items():
            count = 1 if name == config["head_node_type"] else node_type.get("max_workers", 0)
            for resource, amount in node_type.get("resources", {}).items():
                totals[resource] = totals.get(resource, 0) + amount * count
        return totals
    # The monitor's status names each node's type; without an autoscaling config (a local
    # Ray, `ray start --head`) every node has the read-only provider's anonymous type.
    status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}")
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    managed = any(t != format_readonly_node_type(node) for node, t in types.items())
    return None if managed else {}


def generate_on_ray(args, out: Output, work: list[list[dict[str, Any]]], recorder: Recorder,
                    progress: Progress, pool: Pool) -> None:
    """Runs the batches through a GenerationActor pool and records results as they arrive."""
    import ray.data

    from sdbatch.actors import GenerationActor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    compute = (ray.data.ActorPoolStrategy(size=pool.min_size) if pool.min_size == pool.max_size
               else ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size))
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    # One item per batch, so Ray Data can never split or merge the planned batches; blocks
    # are built on the driver (from_items), one or a few batches each.
    items = [{"rows": json.dumps(batch)} for batch in work]
    features = getattr(args, "run_features", None)  # run --metrics (sdbatch.metrics.RunFeatures)
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 20_000)).map_batches(
        GenerationActor, compute=compute, batch_size=1, batch_format="pyarrow",
        num_gpus=pool.num_gpus or None, num_cpus=pool.num_cpus,
        fn_constructor_kwargs=dict(model=args.model, output=out.uri, dtype=args.dtype,
                                   device="auto" if pool.num_gpus else "cpu", threads=pool.threads,
                                   inception_weights=features.actor_weights() if features else None),
        **({"runtime_env": {"env_vars": env}} if env else {}))
    with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) as blocks:
        for block in blocks:  # closing: a failure here stops the actors at once
            record_block(args, out, block, features, recorder, progress)


def record_block(args, out: Output, block, features, recorder: Recorder, progress: Progress) -> None:
    """Checks a block of actor results and records it."""
    if features is not None:
        block = features.take(block)
    results = block.to_pylist()
    other = {r["model_hash"] for r in results} - {args.expected_hash}
    if args.expected_hash and other:  # checked before anything of this model is recorded
        raise JobError(f"the model {args.model} now has hash {other.pop()[:10]}, but {out.uri} "
                       f"was generated with {args.expected_hash[:10]}; use another --output, "
                       f"or --overwrite")
    progress.update(*recorder.add(results))


# ----------------------------------------------------------------------------- commands


def generation_settings(args) -> dict[str, Any]:
    return dict(model=args.model, steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                width=args.width, height=args.height, seed=args.seed, dtype=args.dtype)


def run_command(args) -> int:
    from sdbatch.model.samplers import SAMPLERS

    if args.sampler not in SAMPLERS:
        raise JobError(f"--sampler {args.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    out = Output(args.output)
    settings = generation_settings(args)
    table = read_table(args.prompts)
    previous = out.read_run()
    if previous and previous["settings"] != settings and not args.overwrite:
        diff = ", ".join(f"{k} {previous['settings'].get(k)!r} -> {v!r}"
                         for k, v in settings.items() if previous["settings"].get(k) != v)
        raise JobError(f"{out.uri} holds images made with other generation settings ({diff}); "
                       f"use another --output, or --overwrite to delete its images, manifest and "
                       f"errors and start again")
    if args.overwrite:
        out.clear()
        previous = None
    plan = make_plan(table, settings)
    done, failed = set(out.ids("manifest")), set(out.ids("errors"))
    recorded = done | failed
    # whole batches, as planned, for every batch with an image not yet recorded
    work = [[dict(r, skip=r["id"] in recorded) for r in batch]
            for batch in make_batches(plan.rows, args.batch_size)
            if any(r["id"] not in recorded for r in batch)]
    todo = [r for batch in work for r in batch if not r["skip"]]
    new_errors = [e for e in plan.errors if e["id"] not in recorded]
    if new_errors:
        out.write_part("errors", errors_table(new_errors, table))
        failed |= {e["id"] for e in new_errors}
    args.expected_hash = (previous or {}).get("model_hash")
    run = dict(settings=settings, model_hash=args.expected_hash, prompts=args.prompts, rows=plan.total,
               batch_size=args.batch_size, workers=args.workers, versions=_versions(),
               started=_now(), finished=None)
    out.write_run(run)
    table_ids = {r["id"] for r in plan.rows} | {e["id"] for e in plan.errors}
    print(f"{plan.total} images planned: {len(done & table_ids)} already done, "
          f"{len(failed & table_ids)} failed, {len(todo)} to generate", file=sys.stderr)
    if args.metrics:  # weights and reference checked before any image is generated
        from sdbatch.metrics import RunFeatures

        args.run_features = RunFeatures(args.inception_weights, args.reference, len(todo))
    if todo:
        with ray_session(args.address):
            recorder = Recorder(out, table, {r["id"]: r for r in todo})
            progress = Progress(plan.total, plan.total - len(todo))
            try:
                pool = actor_pool(args.workers, args.gpus_per_worker)
                generate_on_ray(args, out, work, recorder, progress, pool)
            finally:
                recorder.flush()
                progress.close()
        run["model_hash"] = recorder.model_hash or run["model_hash"]
    run["finished"] = _now()
    out.write_run(run)
    if args.metrics:
        from sdbatch.metrics import metrics_after_run

        metrics_after_run(out.uri, args.run_features, args.address)
    return summary(out, table_ids, plan.total)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
    if failed:
        print(f"{failed} rows failed: see {out.uri_of('errors')} (delete it and re-run to retry them)",
              file=sys.stderr)
    return 1 if failed or remaining else 0


def status_command(args) -> int:
    out = Output(args.output)
    run = out.read_run()
    if run is None:
        raise JobError(f"{out.uri} has no run.json: not the output of `sdbatch.jobs run`")
    done, failed = counts(out)
    remaining = max(0, run["rows"] - done - failed)
    print(f"done: {done}\nerrored: {failed}\nremaining: {remaining}")
    return 0


def _workers(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError("must be a positive integer or 'auto'")
    return value


def build_parser(with_metrics: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdbatch.jobs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate the images of a prompt table")
    run.add_argument("prompts", help="Parquet file, folder or glob; local or fsspec URI (s3://...)")
    run.add_argument("--model", required=True, help="checkpoint (.safetensors/.ckpt) or diffusers folder; path or URI")
    run.add_argument("--output", required=True, help="output folder; path or URI")
    run.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="sampling steps (default: %(default)s)")
    run.add_argument("--cfg-scale", type=float, default=DEFAULTS["cfg_scale"], help="guidance scale (default: %(default)s)")
    run.add_argument("--sampler", default=DEFAULTS["sampler"],
                     help="ddpm, ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras (default: %(default)s)")
    run.add_argument("--width", type=int, default=DEFAULTS["width"], help="multiple of 8 (default: %(default)s)")
    run.add_argument("--height", type=int, default=DEFAULTS["height"], help="multiple of 8 (default: %(default)s)")
    run.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                     help="base of the seeds of rows without a seed (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=4, help="images per model call (default: %(default)s)")
    run.add_argument("--workers", type=_workers, default=None,
                     help="actors: N, or 'auto' to scale with the cluster (default: one per GPU, or 1 on CPU)")
    run.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto: float16 on CUDA, bfloat16 on CPUs with fast bf16, else float32")
    run.add_argument("--overwrite", action="store_true", help="delete OUT's previous outputs first")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--metrics", action="store_true",
                     help="end with FID/IS/KID against --reference (OUT/metrics.json), taking each new "
                          "image's Inception features while it is in memory")
    run.add_argument("--reference", metavar="REF", help="with --metrics: reference images or .npz statistics, "
                     "as for the metrics command")
    run.add_argument("--inception-weights", metavar="PATH", help="with --metrics: as for the metrics command")
    run.set_defaults(handler=run_command)

    status = sub.add_parser("status", help="count done, errored and remaining rows of OUT")
    status.add_argument("output")
    status.set_defaults(handler=status_command)

    metrics = sub.add_parser("metrics", help="FID / IS / KID of generated images")
    metrics.set_defaults(handler=None)
    if with_metrics:  # imported only when asked for: `run` needs none of the metrics extra
        from sdbatch.metrics import add_metrics_arguments, metrics_command

        add_metrics_arguments(metrics)
        metrics.set_defaults(handler=metrics_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_metrics=argv[:1] == ["metrics"]).parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
