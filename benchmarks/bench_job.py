"""Ray's overhead in the batch job: the job's wall time against a plain in-process loop that
calls `sdbatch.generate` over the same rows (same model, ids, seeds, batches, torch threads).

    python benchmarks/bench_job.py [--rows 24] [--size 64] [--steps 10] [--batch-size 4] [--threads 2]

Both sides load the model and generate every image; the job also starts its actor, writes
PNGs, the manifest and run.json. overhead = (job - loop) / job, with the job timed from the
command's start on a running Ray (Ray's own start-up is printed separately). The model is a
small random-weight checkpoint (sdbatch.model.weights.save_random_checkpoint), so the
numbers measure the job's machinery, not the model.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import sdbatch
from sdbatch import jobs
from sdbatch.model.weights import save_random_checkpoint


def loop(model_path: str, table: str, args) -> float:
    """The baseline: the job's own plan, generated batch by batch in this process."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    model = sdbatch.load_model(model_path, device="cpu", dtype="auto")  # as the job's CPU actors
    settings = dict(jobs.DEFAULTS, steps=args.steps, width=args.size, height=args.size, sampler=args.sampler)
    for batch in jobs.make_batches(jobs.make_plan(jobs.read_table(table), settings).rows, args.batch_size):
        r = batch[0]
        sdbatch.generate(model, [x["prompt"] for x in batch], [x["negative_prompt"] for x in batch],
                         seeds=[x["seed"] for x in batch], steps=r["steps"], cfg_scale=r["cfg_scale"],
                         sampler=r["sampler"], width=r["width"], height=r["height"], progress=False)
    return time.perf_counter() - start


def job(model_path: str, table: str, out: str, args) -> float:
    start = time.perf_counter()
    rc = jobs.main(["run", table, "--model", model_path, "--output", out, "--steps", str(args.steps),
                    "--width", str(args.size), "--height", str(args.size), "--sampler", args.sampler,
                    "--batch-size", str(args.batch_size), "--workers", "1"])
    assert rc == 0, rc
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sampler", default="dpmpp_2m_karras")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    args = p.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-job-"))
    model = str(save_random_checkpoint(tmp / "random.safetensors"))
    table = str(tmp / "prompts.parquet")
    pq.write_table(pa.table({"prompt": [f"benchmark prompt number {i}" for i in range(args.rows)]}), table)

    start = time.perf_counter()
    ray.init(num_cpus=args.threads, logging_level="WARNING")  # the job's one CPU actor gets all threads
    ray_start = time.perf_counter() - start
    try:
        t_job = job(model, table, str(tmp / "out"), args)
    finally:
        ray.shutdown()
    t_loop = loop(model, table, args)
    result = dict(rows=args.rows, size=args.size, steps=args.steps, batch_size=args.batch_size,
                  threads=args.threads, loop_s=round(t_loop, 2), job_s=round(t_job, 2),
                  ray_start_s=round(ray_start, 2), overhead=round((t_job - t_loop) / t_job, 4),
                  loop_images_per_s=round(args.rows / t_loop, 3), job_images_per_s=round(args.rows / t_job, 3))
    print(json.dumps(result))
    print(f"in-process loop {t_loop:.1f} s, job {t_job:.1f} s (+ Ray start {ray_start:.1f} s): "
          f"Ray's overhead {100 * result['overhead']:.1f}% of the job's wall time")


if __name__ == "__main__":
    main()
