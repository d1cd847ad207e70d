"""Inception feature extraction throughput: sdbatch's metrics path vs torch-fidelity, same images.

    .venv/bin/python benchmarks/bench_metrics.py [--images 32] [--size 512] [--workers 1]
                                                 [--weights PATH] [--batch-size 32]

Writes N random-content PNGs of SIZE x SIZE (SD outputs are 512x512 PNGs: decoding is part of
the cost), then times, each from the files to the 2048-d features and logits:
- torch-fidelity in one process (`calculate_metrics(input1=folder, isc=True)`, its own loader);
- sdbatch's `extract_shard` in this process (the code an actor runs; threaded PNG reads);
- sdbatch on Ray: a local Ray with --workers InceptionFeatureActors (actor start-up included).
Without --weights a random-weight file is used: the speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from sdbatch import inception
from sdbatch.jobs import metrics as metrics_job


def write_images(folder: str, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.random((3, 3)) * 4
        ramp = np.stack([a[k] * x + b[k] * y + c[k] for k in range(3)], -1) % 1 * 200
        noise = rng.integers(0, 56, (size, size, 3))
        Image.fromarray((ramp + noise).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        write_images(folder, args.images, args.size)
        weights = args.weights or inception.save_random_inception_weights(os.path.join(tmp, "inception.pth"))
        w = inception.load_inception_weights(weights)
        print(f"{args.images} PNGs {args.size}x{args.size}, {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
              f"{torch.get_num_threads()} torch threads, batch {args.batch_size}", flush=True)

        import torch_fidelity

        # Warm-up, so that neither side pays for the one-off kernel set-up of the first batch.
        inception.extract_arrays(inception.build_inception(w.state_dict, "cuda" if cuda else "cpu"),
                               [np.zeros((args.size, args.size, 3), np.uint8)] * 2)
        start = time.perf_counter()
        torch_fidelity.calculate_metrics(input1=folder, isc=True, cuda=cuda, batch_size=args.batch_size,
                                         feature_extractor_weights_path=weights, cache=False, verbose=False)
        results = {"torch-fidelity (one process)": time.perf_counter() - start}

        start = time.perf_counter()
        model = inception.build_inception(w.state_dict, "cuda" if cuda else "cpu")
        source = inception.open_source(folder)
        for _, spec in source.shards(args.images):
            inception.extract_shard(model, spec, args.batch_size, keep_features=True, keep_logits=True)
        results["sdbatch extract_shard (one process)"] = time.perf_counter() - start
        del model

        import ray

        ray_tmp = tempfile.mkdtemp(prefix="bm-", dir="/tmp")  # short: Ray's socket paths
        ray.init(address="local", _temp_dir=ray_tmp, include_dashboard=False, logging_level="WARNING")
        try:
            side = metrics_job.Side(source, readable=np.zeros(source.count, dtype=bool))
            start = time.perf_counter()
            metrics_job.extract_on_ray([(side, False, False)], w, args.workers, args.batch_size)
            results[f"sdbatch on Ray ({args.workers} actor{'s' * (args.workers > 1)}, start-up included)"] = \
                time.perf_counter() - start
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    base = args.images / results["torch-fidelity (one process)"]
    for name, seconds in results.items():
        rate = args.images / seconds
        print(f"{name:55s} {seconds:7.1f} s  {rate:6.2f} images/s  x{rate / base:.2f}")


if __name__ == "__main__":
    sys.exit(main())
