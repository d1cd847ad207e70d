"""The batch job: a Parquet table of prompts in, a folder of images with a manifest out.

    python -m sdbatch.jobs run PROMPTS [--model SRC] --output OUT [options]
    python -m sdbatch.jobs plan PROMPTS [--model SRC] --output OUT [options]
    python -m sdbatch.jobs status OUT

`run` works in three steps (`plan` does the first and prints it):
1. Plan, on the driver, column by column (sdbatch.jobs.plan): read the table's planning columns
   (a Parquet file, folder or glob, local or any fsspec URI), check them, derive each image's id
   and seed, check each row, cut the images into batches of one shape, and skip the batches
   whose ids OUT already records (in its manifest or errors), so a re-run does only what is
   missing.
2. Generate, on Ray: the batches to run go to Ray's object store as Arrow blocks (one row per
   batch), and Ray Data's `map_batches` hands each batch to a pool of `GenerationActor`s (one GPU each, or CPU threads split across actors), which write
   `OUT/images/<id>.png` and return each image's manifest row.
3. Record, on the driver (sdbatch.jobs.record): manifest and error rows are written as Parquet
   parts named by the hash of their ids, so no run ever writes a row twice, and a killed run
   loses at most the rows it had not yet recorded (whose images are then regenerated, byte for
   byte); the parts are compacted as they pile up and at the end (sdbatch.jobs.compact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdbatch.errors import JobError
from sdbatch.jobs.compact import compact_at_end
from sdbatch.jobs.common import Pool, Progress, actor_pool, check_model, now, ray_session, versions
from sdbatch.jobs.output import Output, counts, summary
from sdbatch.jobs.plan import (COLUMN_KINDS, Batches, Plan, Source, check_settings, make_batches, make_plan,
                               select_work)
from sdbatch.jobs.record import Recorder, errors_table

MAX_BLOCKS = 20_000  # Ray Data blocks of work: each goes to one actor call, its batches in turn
CHUNK_BATCHES = 4096  # batches the driver builds at once (carried columns read back together)


def work_table(plan: Plan, work: Batches, source: Source, first: int, last: int):
    """Batches first..last-1 of `work` as a pyarrow Table, one row per batch: its images in a column
    `rows`, a list<struct> of PLAN_COLUMNS, row, plan_index (the image's position in
    plan.images), skip, and `carried` (a struct of the table's other columns, read back by row)
    when the table has any."""
    import pyarrow as pa

    starts = work.starts[first:last + 1]
    positions = work.order[starts[0]:starts[-1]]
    rows = plan.columns(positions)
    rows = rows.append_column("plan_index", pa.array(positions)).append_column(
        "skip", pa.array(work.skip[starts[0]:starts[-1]]))
    carried = [c for c in source.column_names if c not in COLUMN_KINDS]
    if carried:
        extra = source.take(rows.column("row").to_numpy(), carried)
        rows = rows.append_column("carried", pa.StructArray.from_arrays(
            [c.combine_chunks() for c in extra.columns], fields=list(extra.schema)))
    struct = pa.StructArray.from_arrays([c.combine_chunks() for c in rows.columns], fields=list(rows.schema))
    return pa.table({"rows": pa.ListArray.from_arrays(pa.array(starts - starts[0], pa.int32()), struct)})


def work_blocks(plan: Plan, work: Batches, source: Source) -> Iterator[Any]:
    """The work as at most MAX_BLOCKS pyarrow Tables (`work_table`'s rows), built CHUNK_BATCHES
    batches at a time, so that the driver never holds more than a chunk of it."""
    per_block = max(1, -(-len(work) // MAX_BLOCKS))
    per_chunk = per_block * max(1, CHUNK_BATCHES // per_block)
    for first in range(0, len(work), per_chunk):
        chunk = work_table(plan, work, source, first, min(first + per_chunk, len(work)))
        for lo in range(0, chunk.num_rows, per_block):
            yield chunk.take(np.arange(lo, min(lo + per_block, chunk.num_rows)))  # a copy: puts only its rows


def generate_on_ray(args, job: Job, recorder: Recorder, progress: Progress, pool: Pool) -> None:
    """Runs the job's work through a GenerationActor pool and records results as they arrive."""
    import ray
    import ray.data

    from sdbatch.actors import GenerationActor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Two calls per actor at once: while one holds the model (GenerationActor.busy), the other
    # watermarks, signs and writes the images it made, off the GPU's critical path.
    size = (dict(size=pool.min_size) if pool.min_size == pool.max_size
            else dict(min_size=pool.min_size, max_size=pool.max_size))
    compute = ray.data.ActorPoolStrategy(**size, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    features = getattr(args, "run_features", None)  # run --metrics (sdbatch.metrics.RunFeatures)
    # One row per batch (batch_size=1), so Ray Data can never split or merge the planned batches;
    # the blocks go to the object store as they are built.
    ds = ray.data.from_arrow_refs([ray.put(block) for block in work_blocks(job.plan, job.work, job.source)])
    ds = ds.map_batches(
        GenerationActor, compute=compute, batch_size=1, batch_format="pyarrow",
        num_gpus=pool.num_gpus or None, num_cpus=pool.num_cpus,
        fn_constructor_kwargs=dict(model=args.model, output=job.out.uri, dtype=args.dtype,
                                   device="auto" if pool.num_gpus else "cpu", threads=pool.threads, ema=args.ema,
                                   inception_weights=features.actor_weights() if features else None,
                                   safeguards=dataclasses.replace(args.safeguards, blocklist=None)),
        **({"runtime_env": {"env_vars": env}} if env else {}))
    with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) as blocks:
        for block in blocks:  # closing: a failure here stops the actors at once
            record_block(args, job.out, block, features, recorder, progress)


def record_block(args, out: Output, block, features, recorder: Recorder, progress: Progress) -> None:
    """Checks a block of actor results and records it."""
    import pyarrow.compute as pc

    if features is not None:
        block = features.take(block)
    other = set(pc.unique(block.column("model_hash")).drop_null().to_pylist()) - {args.expected_hash}
    if args.expected_hash and other:  # checked before anything of this model is recorded
        raise JobError(f"the model {args.model} now has hash {other.pop()[:10]}, but {out.uri} "
                       f"was generated with {args.expected_hash[:10]}; use another --output, "
                       f"or --overwrite")
    progress.update(*recorder.add(block))


def check_safeguards(args):
    """The run's SafeguardSettings (also set as args.safeguards) and its blocklist (or None),
    checked before anything is generated. Raises JobError naming the bad file or option."""
    from sdbatch.safeguards import SafeguardSettings

    try:
        args.safeguards = SafeguardSettings.from_args(args)
        return args.safeguards.check()
    except ValueError as e:
        raise JobError(str(e)) from None


def generation_settings(args) -> dict[str, Any]:
    """What an OUT's images depend on; the model as its sha256 when known (so the same weights by
    another path are the same model), else its URI; and the safeguards that change which images
    are written and how (blocklist, safety checker, watermark). Needs args.safeguards."""
    guards = args.safeguards
    return dict(model=args.model_hash or args.model, steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                width=args.width, height=args.height, seed=args.seed, dtype=args.dtype, ema=args.ema,
                watermark=guards.watermark, blocklist=guards.blocklist, safety_checker=guards.safety_checker)


@dataclass
class Job:
    """What `run` does, worked out before anything starts (`prepare`)."""

    out: Output
    source: Source
    plan: Plan
    batches: Batches       # every batch of the plan
    work: Batches          # the batches to run (with an image OUT does not hold), skip set
    new_errors: Any        # pyarrow Table (id, error, row): the plan's errors OUT does not hold yet
    done: int              # images of this table OUT holds
    failed: int            # errors of this table OUT holds, new_errors included
    previous: dict[str, Any] | None
    settings: dict[str, Any]

    @property
    def todo(self) -> int:
        return int((~self.work.skip).sum())

    @functools.cached_property
    def table_ids(self):
        """The ids of every image and error of the table (pyarrow string array; repeats possible),
        built once: prepare, an interrupted run and the summary all ask for them."""
        import pyarrow as pa

        return pa.chunked_array(self.plan.images.column("id").chunks + self.plan.errors.column("id").chunks,
                                type=pa.string()).combine_chunks()


def prepare(args, clear: bool) -> Job:
    """Checks the options, the model, the safeguards and the table, and plans (`run`'s first step,
    and all of `plan`). With --overwrite, OUT is cleared when `clear`, else planned as empty.
    Raises JobError naming a bad option, file, column or an OUT made with other settings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sdbatch.builtin import default_model
    from sdbatch.model.samplers import SAMPLERS
    from sdbatch.model.weights import size_or_native

    if args.sampler not in SAMPLERS:
        raise JobError(f"--sampler {args.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    args.model, args.model_hash = check_model(default_model(args.model))
    args.width, args.height = size_or_native(args.model, args.width, args.height)
    check_settings(vars(args))
    out = Output(args.output)
    blocklist = check_safeguards(args)
    settings = generation_settings(args)
    source = Source(args.prompts)
    previous = out.read_run()
    if previous and previous["settings"] != settings and not args.overwrite:
        diff = ", ".join(f"{k} {previous['settings'].get(k)!r} -> {v!r}"
                         for k, v in settings.items() if previous["settings"].get(k) != v)
        raise JobError(f"{out.uri} holds images made with other generation settings ({diff}); "
                       f"use another --output, or --overwrite to delete its images, manifest and "
                       f"errors and start again")
    if args.overwrite:
        if clear:
            out.clear()
        previous = None
    plan = make_plan(source.read(list(COLUMN_KINDS)), settings, blocklist)
    empty = pa.chunked_array([], pa.string())
    done_ids, failed_ids = (empty, empty) if args.overwrite else (out.id_column("manifest"), out.id_column("errors"))
    recorded = pa.chunked_array(done_ids.chunks + failed_ids.chunks, type=pa.string()).combine_chunks()
    batches = make_batches(plan, args.batch_size)
    work = select_work(plan, batches, recorded)
    errors = plan.errors
    new_errors = errors.filter(pc.invert(pc.is_in(errors.column("id"), value_set=recorded))) if len(recorded) else errors
    job = Job(out, source, plan, batches, work, new_errors, 0, 0, previous, settings)
    table_ids = job.table_ids

    def in_table(ids) -> int:
        return int(pc.sum(pc.is_in(pc.unique(ids), value_set=table_ids)).as_py() or 0) if len(ids) else 0

    job.done = in_table(done_ids)
    job.failed = in_table(pa.chunked_array(failed_ids.chunks + new_errors.column("id").chunks, type=pa.string()))
    return job


def run_command(args) -> int:
    job = prepare(args, clear=True)
    out, plan = job.out, job.plan
    if job.new_errors.num_rows:
        out.write_part("errors", errors_table(job.new_errors, job.source))
    args.expected_hash = (job.previous or {}).get("model_hash") or args.model_hash
    run = dict(settings=job.settings, model_hash=args.expected_hash, model_source=args.model, prompts=args.prompts,
               rows=plan.total,
               batch_size=args.batch_size, workers=args.workers, versions=versions(),
               safeguards=dataclasses.asdict(args.safeguards),
               started=now(), finished=None)
    out.write_run(run)
    print(f"{plan.total} images planned: {job.done} already done, {job.failed} failed, {job.todo} to generate",
          file=sys.stderr)
    if args.metrics:  # weights and reference checked before any image is generated
        from sdbatch.jobs.metrics import RunFeatures

        args.run_features = RunFeatures(args.inception_weights, args.reference, job.todo)
    if job.todo:
        try:
            with ray_session(args.address):
                recorder = Recorder(out, job.source, plan.images.num_rows)
                progress = Progress(plan.total, plan.total - job.todo, job.failed)
                try:
                    pool = actor_pool(args.workers, args.gpus_per_worker)
                    generate_on_ray(args, job, recorder, progress, pool)
                finally:
                    recorder.flush()  # what arrived is recorded, also on Ctrl-C
                    progress.close()
        except KeyboardInterrupt:
            done, failed = counts(out, job.table_ids)
            print(f"interrupted: {done} images and {failed} errors of {plan.total} rows are recorded in "
                  f"{out.uri}; run the same command again to resume (it generates only the rest)",
                  file=sys.stderr)
            return 130
        run["model_hash"] = recorder.model_hash or run["model_hash"]
    run["finished"] = now()
    out.write_run(run)
    compact_at_end(out)  # the manifest's and errors' parts merged into a few files (also a killed run's)
    if args.metrics:
        from sdbatch.jobs.metrics import metrics_after_run

        metrics_after_run(out.uri, args.run_features, args.address)
    return summary(out, job.table_ids, plan.total)


def describe_shape(key: tuple) -> str:
    """A plan.shape_key as `jobs plan` prints it."""
    width, height, steps, sampler, cfg_scale, init, strength = key
    return f"{width}x{height}, {steps} steps, {sampler}, cfg {cfg_scale:g}" + (f", img2img {strength:g}" if init else "")


def plan_command(args) -> int:
    """`jobs plan`: what `run` would do with the same options, on stdout; starts and writes nothing."""
    job = prepare(args, clear=False)
    plan, batches, work = job.plan, job.batches, job.work
    print(f"{plan.total} images planned from {plan.num_rows} rows of {args.prompts}: {job.done} already done, "
          f"{job.failed} failed, {job.todo} to generate")
    print(f"{len(work)} of {len(batches)} batches to run (--batch-size {args.batch_size})")
    rows = plan.images.column("row").to_numpy()
    shape_of = plan.shape[rows]
    columns = dict(
        images=np.bincount(shape_of, minlength=len(plan.shapes)),
        batches=np.bincount(shape_of[batches.order[batches.starts[:-1]]], minlength=len(plan.shapes)),
        run=np.bincount(shape_of[work.order[work.starts[:-1]]], minlength=len(plan.shapes)),
        generate=np.bincount(shape_of[work.order[~work.skip]], minlength=len(plan.shapes)))
    names = [describe_shape(s) for s in plan.shapes]
    width = max([len("shape"), *map(len, names)])
    print(f"{'shape':<{width}}  {'images':>10}  {'batches':>10}  {'to run':>10}  {'to generate':>11}")
    for k, name in enumerate(names):
        print(f"{name:<{width}}  {columns['images'][k]:>10}  {columns['batches'][k]:>10}  {columns['run'][k]:>10}  "
              f"{columns['generate'][k]:>11}")
    return 0


def status_command(args) -> int:
    out = Output(args.output)
    run = out.read_run()
    if run is None:
        raise JobError(f"{out.uri} has no run.json: not the output of `sdbatch.jobs run`")
    done, failed = counts(out)
    remaining = max(0, run["rows"] - done - failed)
    print(f"done: {done}\nerrored: {failed}\nremaining: {remaining}")
    return 0
