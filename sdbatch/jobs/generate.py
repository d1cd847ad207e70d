"""The batch job: a Parquet table of prompts in, a folder of images with a manifest out.

    python -m sdbatch.jobs run PROMPTS --model SRC --output OUT [options]
    python -m sdbatch.jobs status OUT

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

import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

from sdbatch.errors import JobError
from sdbatch.jobs.compact import compact_at_end
from sdbatch.jobs.common import Pool, Progress, actor_pool, check_model, now, ray_session, versions
from sdbatch.jobs.output import Output, counts, summary
from sdbatch.jobs.record import Recorder, errors_table
from sdbatch.jobs.plan import check_settings, make_batches, make_plan, read_table


def generate_on_ray(args, out: Output, work: list[list[dict[str, Any]]], recorder: Recorder,
                    progress: Progress, pool: Pool) -> None:
    """Runs the batches through a GenerationActor pool and records results as they arrive."""
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
    # One item per batch, so Ray Data can never split or merge the planned batches; blocks
    # are built on the driver (from_items), one or a few batches each.
    items = [{"rows": json.dumps(batch)} for batch in work]
    features = getattr(args, "run_features", None)  # run --metrics (sdbatch.metrics.RunFeatures)
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 20_000)).map_batches(
        GenerationActor, compute=compute, batch_size=1, batch_format="pyarrow",
        num_gpus=pool.num_gpus or None, num_cpus=pool.num_cpus,
        fn_constructor_kwargs=dict(model=args.model, output=out.uri, dtype=args.dtype,
                                   device="auto" if pool.num_gpus else "cpu", threads=pool.threads, ema=args.ema,
                                   inception_weights=features.actor_weights() if features else None,
                                   safeguards=dataclasses.replace(args.safeguards, blocklist=None)),
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


def check_safeguards(args):
    """The run's SafeguardSettings (also set as args.safeguards) and its blocklist (or None),
    checked before anything is generated. Raises JobError naming the bad file or option."""
    from sdbatch.safeguards import SafeguardSettings

    try:
        args.safeguards = SafeguardSettings.from_args(args)
        return args.safeguards.check()
    except ValueError as e:
        raise JobError(str(e)) from None


def block_prompts(plan, blocklist) -> None:
    """Moves the plan's rows whose prompt or negative prompt matches a blocklist rule to its
    errors (naming the rule): nothing is generated for them."""
    kept = []
    for r in plan.rows:
        why = blocklist.check(r["prompt"], r["negative_prompt"])
        if why is None:
            kept.append(r)
        else:
            plan.errors.append(dict(id=r["id"], row=r["row"], error=f"Row {r['row']} (id {r['id']!r}): {why}."))
    plan.rows = kept


def generation_settings(args) -> dict[str, Any]:
    """What an OUT's images depend on; the model as its sha256 when known (so the same weights by
    another path are the same model), else its URI; and the safeguards that change which images
    are written and how (blocklist, safety checker, watermark). Needs args.safeguards."""
    guards = args.safeguards
    return dict(model=args.model_hash or args.model, steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                width=args.width, height=args.height, seed=args.seed, dtype=args.dtype, ema=args.ema,
                watermark=guards.watermark, blocklist=guards.blocklist, safety_checker=guards.safety_checker)


def run_command(args) -> int:
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
    if blocklist is not None:
        block_prompts(plan, blocklist)
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
    args.expected_hash = (previous or {}).get("model_hash") or args.model_hash
    run = dict(settings=settings, model_hash=args.expected_hash, model_source=args.model, prompts=args.prompts,
               rows=plan.total,
               batch_size=args.batch_size, workers=args.workers, versions=versions(),
               safeguards=dataclasses.asdict(args.safeguards),
               started=now(), finished=None)
    table_ids = {r["id"] for r in plan.rows} | {e["id"] for e in plan.errors}
    out.write_run(run)
    print(f"{plan.total} images planned: {len(done & table_ids)} already done, "
          f"{len(failed & table_ids)} failed, {len(todo)} to generate", file=sys.stderr)
    if args.metrics:  # weights and reference checked before any image is generated
        from sdbatch.jobs.metrics import RunFeatures

        args.run_features = RunFeatures(args.inception_weights, args.reference, len(todo))
    if todo:
        try:
            with ray_session(args.address):
                recorder = Recorder(out, table, {r["id"]: r for r in todo})
                progress = Progress(plan.total, plan.total - len(todo), len(failed & table_ids))
                try:
                    pool = actor_pool(args.workers, args.gpus_per_worker)
                    generate_on_ray(args, out, work, recorder, progress, pool)
                finally:
                    recorder.flush()  # what arrived is recorded, also on Ctrl-C
                    progress.close()
        except KeyboardInterrupt:
            done, failed = counts(out, table_ids)
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
    return summary(out, table_ids, plan.total)


def status_command(args) -> int:
    out = Output(args.output)
    run = out.read_run()
    if run is None:
        raise JobError(f"{out.uri} has no run.json: not the output of `sdbatch.jobs run`")
    done, failed = counts(out)
    remaining = max(0, run["rows"] - done - failed)
    print(f"done: {done}\nerrored: {failed}\nremaining: {remaining}")
    return 0
