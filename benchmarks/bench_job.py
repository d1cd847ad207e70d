"""Ray's overhead in the batch job: the job's wall time against a plain in-process loop that
calls `sdbatch.generate` over the same rows (same model, ids, seeds, batches, torch threads).

    python benchmarks/bench_job.py [--rows 24] [--size 64] [--steps 10] [--batch-size 4] [--threads 2]

Both sides load the model and generate every image; the job also starts its actor, writes
PNGs, the manifest and run.json. Two figures, both as a share of the job's wall time (timed
from the command's start on a running Ray; Ray's own start-up is printed separately):
overhead_wall = (job - loop) / job, and overhead_outside_generate = the job's time outside
generate() minus the loop's, which does not move when the machine's speed drifts between
the two runs (on a shared machine it does). The model is a
small random-weight checkpoint (sdbatch.model.weights.save_random_checkpoint), so the
numbers measure the job's machinery, not the model.
"""

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def loop(model_path: str, table: str, args) -> tuple[float, float]:
    """The baseline: the job's own plan, generated batch by batch in this process.
    Returns (wall seconds, seconds inside sdbatch.generate)."""
    import torch

    import sdbatch
    from sdbatch.jobs import plan as jobs

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    model = sdbatch.load_model(model_path, device="cpu", dtype="auto")  # as the job's CPU actors
    settings = dict(jobs.DEFAULTS, steps=args.steps, width=args.size, height=args.size, sampler=args.sampler)
    generating = 0.0
    plan = jobs.make_plan(jobs.read_table(table), settings)
    batches = jobs.make_batches(plan, args.batch_size)
    for batch in (plan.rows(batches.order[a:b]) for a, b in zip(batches.starts[:-1], batches.starts[1:])):
        r = batch[0]
        t = time.perf_counter()
        sdbatch.generate(model, [x["prompt"] for x in batch], [x["negative_prompt"] for x in batch],
                         seeds=[x["seed"] for x in batch], steps=r["steps"], cfg_scale=r["cfg_scale"],
                         sampler=r["sampler"], width=r["width"], height=r["height"], progress=False)
        generating += time.perf_counter() - t
    return time.perf_counter() - start, generating


def job(model_path: str, table: str, out: str, args) -> tuple[float, float]:
    """Returns (wall seconds, seconds the actor spent generating, from the manifest)."""
    from sdbatch.jobs import cli

    start = time.perf_counter()
    rc = cli.main(["run", table, "--model", model_path, "--output", out, "--steps", str(args.steps),
                    "--width", str(args.size), "--height", str(args.size), "--sampler", args.sampler,
                    "--batch-size", str(args.batch_size), "--workers", "1"])
    wall = time.perf_counter() - start
    assert rc == 0, rc
    manifest = pa.concat_tables([pq.read_table(p, use_threads=False) for p in Path(out, "manifest").glob("*.parquet")])
    return wall, sum(manifest["seconds"].to_pylist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sampler", default="dpmpp_2m_karras")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    args = p.parse_args()
    # Ray starts a CPU actor with OMP_NUM_THREADS = its CPUs; the loop gets the same OpenMP
    # pool (set before torch loads: torch.set_num_threads alone leaves a bigger pool behind).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ray

    from sdbatch.model.weights import save_random_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-job-"))
    model = str(save_random_checkpoint(tmp / "random.safetensors"))
    table = str(tmp / "prompts.parquet")
    pq.write_table(pa.table({"prompt": [f"benchmark prompt number {i}" for i in range(args.rows)]}), table)

    # The loop runs in a thread, as a Ray actor runs its calls: on the main thread glibc's
    # malloc hands freed memory back to the OS and faults it in again on every step, which
    # made the same generate() calls about 2x slower on CPU here.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # first, before Ray starts
        t_loop, g_loop = pool.submit(loop, model, table, args).result()
    start = time.perf_counter()
    ray.init(num_cpus=args.threads, logging_level="WARNING")  # the job's one CPU actor gets all threads
    ray_start = time.perf_counter() - start
    try:
        t_job, g_job = job(model, table, str(tmp / "out"), args)
    finally:
        ray.shutdown()
    # Generation speed drifts on a shared machine, so also compare what each spends outside
    # generate() (model loading in both; actor start, scheduling, PNGs, manifest in the job).
    outside = (t_job - g_job) - (t_loop - g_loop)
    result = dict(rows=args.rows, size=args.size, steps=args.steps, batch_size=args.batch_size,
                  threads=args.threads, loop_s=round(t_loop, 2), loop_generate_s=round(g_loop, 2),
                  job_s=round(t_job, 2), job_generate_s=round(g_job, 2), ray_start_s=round(ray_start, 2),
                  overhead_wall=round((t_job - t_loop) / t_job, 4),
                  overhead_outside_generate=round(outside / t_job, 4))
    print(json.dumps(result))
    print(f"in-process loop {t_loop:.1f} s ({g_loop:.1f} s generating), job {t_job:.1f} s "
          f"({g_job:.1f} s generating; + Ray start {ray_start:.1f} s)")
    print(f"Ray's overhead: {100 * result['overhead_wall']:.1f}% of the job's wall time by wall times, "
          f"{100 * result['overhead_outside_generate']:.1f}% by time spent outside generate()")


if __name__ == "__main__":
    main()
