"""The service under concurrent load: p50/p99 request latency and images/s of the A1111 API on
Ray Serve (loopback only), against a plain in-process loop over the same images.

    flock /tmp/sdbatch-bench.lock python benchmarks/bench_serve.py [--requests 64] [--clients 8]
        [--size 64] [--steps 10] [--max-batch-size 4] [--cpus 2] [--model SRC]

A local Ray with --cpus CPUs runs the `sdbatch.serve.app:build` application (one CPU replica
whose torch threads are the CPUs, batching up to --max-batch-size images per model call);
--clients threads keep --requests txt2img requests (one image each, distinct seeds, the
Euler a sampler) in flight, each timed from send to answer. The baseline generates the same
images with `sdbatch.generate`, --max-batch-size at a time, in this process with the same
threads, before and after the load (the service idle): `serve_over_loop` is the service's
throughput as a share of the model's own (the mean of the two loops). The default
model is a small random-weight checkpoint, so the figures measure the serving machinery.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port  # noqa: E402


def request_body(i: int, args) -> dict:
    return dict(prompt=f"a photo of object {i}", seed=1000 + i, steps=args.steps, width=args.size,
                height=args.size, sampler_name="Euler a", cfg_scale=7)


def loop(model_path: str, args) -> float:
    """Images/s of sdbatch.generate over the same prompts and seeds, max_batch_size at a time."""
    import torch

    import sdbatch

    torch.set_num_threads(args.cpus)
    model = sdbatch.load_model(model_path, device="cpu", dtype="auto")
    bodies = [request_body(i, args) for i in range(args.requests)]
    sdbatch.generate(model, ["warm up"], seeds=[0], steps=1, width=args.size, height=args.size, progress=False)
    start = time.perf_counter()
    for k in range(0, len(bodies), args.max_batch_size):
        chunk = bodies[k:k + args.max_batch_size]
        sdbatch.generate(model, [b["prompt"] for b in chunk], seeds=[b["seed"] for b in chunk], steps=args.steps,
                         cfg_scale=7.0, sampler="euler_a", width=args.size, height=args.size, progress=False)
    return len(bodies) / (time.perf_counter() - start)


def load(url: str, args) -> tuple[list[float], float]:
    """(latencies in s, images/s) of --requests requests from --clients threads."""
    import requests

    session = requests.Session()

    def post(i: int) -> float:
        start = time.perf_counter()
        r = session.post(f"{url}/sdapi/v1/txt2img", json=request_body(i, args), timeout=600)
        r.raise_for_status()
        assert len(r.json()["images"]) == 1
        return time.perf_counter() - start

    post(-1)  # warm up: the replica's first call, the handle's first route
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        latencies = list(pool.map(post, range(args.requests)))
    return latencies, args.requests / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: a tiny random-weight checkpoint")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus))

    import ray
    from ray import serve

    from sdbatch.model.weights import save_random_checkpoint
    from sdbatch.serve.app import build

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(save_random_checkpoint(os.path.join(tmp, "tiny.safetensors")))
        port = free_port()
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.cpus)}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build({"model": model, "max_batch_size": args.max_batch_size}), name="sdbatch")
            startup = time.perf_counter() - started
            # loop, service, loop: both measured under the same (shared-machine) conditions
            loop_rates = [loop(model, args)]
            latencies, serve_rate = load(f"http://127.0.0.1:{port}", args)
            loop_rates.append(loop(model, args))
        finally:
            serve.shutdown()
            ray.shutdown()
        loop_rate = statistics.mean(loop_rates)
    q = statistics.quantiles(latencies, n=100)
    print(json.dumps(dict(
        requests=args.requests, clients=args.clients, size=args.size, steps=args.steps,
        max_batch_size=args.max_batch_size, cpus=args.cpus, startup_s=round(startup, 1),
        latency_p50_s=round(q[49], 3), latency_p99_s=round(q[98], 3),
        serve_images_per_s=round(serve_rate, 2), loop_images_per_s=[round(r, 2) for r in loop_rates],
        serve_over_loop=round(serve_rate / loop_rate, 3)), indent=2))


if __name__ == "__main__":
    main()
