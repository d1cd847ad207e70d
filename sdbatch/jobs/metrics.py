"""The metrics job: FID, Inception Score and KID of a job's images on Ray, equal to torch-fidelity.

    python -m sdbatch.jobs metrics OUT --reference REF [--inception-weights PATH] [--workers N]
    python -m sdbatch.jobs metrics REF --save-stats ref.npz

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-ported InceptionV3 with
the pt_inception-2015-12-05 weights that published FIDs use), fed uint8 images. Ray actors
(`sdbatch.actors.InceptionFeatureActor`) turn shards of stored images into:
- float64 sufficient statistics of the 2048-d pool features (n, sum x, sum x x^T), which the
  driver adds up: FID then needs 2 x 32 MiB however many images there are;
- the float32 logits (IS) and pool features (KID) of each readable image, which the driver
  writes into memory-mapped files in a temporary folder (4 KiB + 8 KiB per image on disk; RAM
  holds one shard at a time). With them IS and KID are exactly torch-fidelity's: IS permutes
  the readable images with `RandomState(seed)` and splits them as torch-fidelity does, KID
  draws its subsets from the same generator in the same order.
A statistics file (.npz with `mu` and `sigma`, the pytorch-fid / clean-fid format) holds no
per-image features, so it can give FID only; IS needs only the generated images.
`run --metrics` instead takes each new image's features in the generation actors (`RunFeatures`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdbatch import inception, storage
from sdbatch.inception import (WEIGHTS_ENV, InceptionWeights, Source, auto_shard_size, load_inception_weights,
                               resolve_inception_weights, resolve_uri)
from sdbatch.jobs.common import actor_pool, ray_session
from sdbatch.jobs.output import Output
from sdbatch.metrics import (FEATURE_DIM, NUM_CLASSES, FidStats, MetricsError, frechet_distance, inception_score,
                             kernel_inception_distance, save_stats, split_of_rank)

MAX_LISTED_ERRORS = 100


def open_source(uri: str, image_column: str = "image") -> Source:
    """`inception.open_source`, where a job's OUT (a folder with a manifest) is the images its
    manifest lists, sorted by URI, read through `Output` (which leaves out what a compaction in
    progress replaces) rather than the files of its folder. Raises MetricsError when it lists none."""
    if not uri.endswith(".npz"):
        out = Output(uri)
        if storage.exists(out.fs, out.path("manifest")):
            table = out.read("manifest", columns=["image"])
            uris = [] if table is None else [resolve_uri(out.fs, out.root, u) for u in table.column("image").to_pylist() if u]
            if not uris:
                raise MetricsError(f"{uri}: the job's manifest lists no images")
            return Source(uri, "job", uris=sorted(uris))
    return inception.open_source(uri, image_column)


@dataclass
class Settings:
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 2020
    batch_size: int = 32
    threads: int | None = None
    shard_size: int | None = None
    fid: bool = True
    isc: bool = True
    kid: bool = True


@dataclass
class Side:
    """What the driver keeps of one image source: merged FID statistics, which images were
    readable, and (memory-mapped) features and logits of every listed image."""

    source: Source
    stats: FidStats = field(default_factory=FidStats)
    readable: np.ndarray | None = None
    features: np.ndarray | None = None
    logits: np.ndarray | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    def work(self, size: int) -> list[tuple[np.ndarray, tuple]]:
        """(ranks, shard spec) pairs for the images whose features are not known yet."""
        if not self.source.uris:
            return [(np.arange(start, start + spec[4] - spec[3]), spec) for start, spec in self.source.shards(size)]
        todo = np.flatnonzero(~self.readable)
        return [(todo[i:i + size], ("uris", [self.source.uris[r] for r in todo[i:i + size]]))
                for i in range(0, len(todo), size)]

    def add(self, ranks: np.ndarray, result: dict[str, Any]) -> None:
        """Records a shard's result (`extract_shard`) for the images of the given ranks."""
        self.errors += result["errors"]
        self.record(ranks[result["ok"]], result["stats"], result["features"], result["logits"])

    def record(self, rows: np.ndarray, stats: FidStats, features: np.ndarray | None, logits: np.ndarray | None) -> None:
        """Marks `rows` readable with their statistics, features and logits (those the side keeps)."""
        self.readable[rows] = True
        self.stats.merge(stats)
        if self.features is not None:
            self.features[rows] = features
        if self.logits is not None:
            self.logits[rows] = logits

    def counts(self) -> dict[str, Any]:
        return {"source": self.source.uri, "listed": self.source.count, "used": self.stats.n,
                "unreadable": len(self.errors)}


def _memmap(folder: str, name: str, rows: int, dim: int) -> np.ndarray:
    return np.lib.format.open_memmap(os.path.join(folder, name), mode="w+", dtype=np.float32, shape=(rows, dim))


def extract_on_ray(sides: list[tuple[Side, bool, bool]], weights: InceptionWeights, workers: int | None,
                   batch_size: int, threads: int | None = None, shard_size: int | None = None) -> str:
    """Runs every shard of every side through a pool of InceptionFeatureActors; returns the device."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from sdbatch.actors import InceptionFeatureActor

    pool = actor_pool(str(workers) if workers else None, None)
    # Inside a list, the reference reaches the actor as it is: the actor fetches the weights
    # once, on its first call (the driver holds the reference until the run ends).
    state = [ray.put(weights.state_dict)]
    actor_cls = ray.remote(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=2,
                           max_task_retries=2)(InceptionFeatureActor)
    actors = [actor_cls.remote(threads=threads or pool.threads, batch_size=batch_size)
              for _ in range(pool.max_size)]
    device = ray.get(actors[0].device.remote())
    total = sum(int((~side.readable).sum()) for side, _, _ in sides)
    size = shard_size or auto_shard_size(total, len(actors))
    work = [(side, ranks, spec, feats, logits) for side, feats, logits in sides
            for ranks, spec in side.work(size)]
    try:
        with tqdm(total=total, unit="img", desc="Inception features", file=sys.stderr) as bar:
            results = ActorPool(actors).map_unordered(
                lambda a, i: a.extract.remote(i, *work[i][2:], weights=state), range(len(work)))
            for result in results:
                side, ranks = work[result["index"]][:2]
                side.add(ranks, result)
                bar.update(len(result["ok"]) + len(result["errors"]))
    finally:
        for actor in actors:
            ray.kill(actor)
    return device


def compute_metrics(generated: Source, reference: Source | None, weights: InceptionWeights,
                    settings: Settings, workers: int | None = None, save_stats_to: str | None = None,
                    collected: RunFeatures | None = None) -> dict[str, Any]:
    """Everything `metrics` prints: the numbers (torch-fidelity key names), counts, settings.
    `collected`: features a `run --metrics` already has; only the other images are read."""
    warnings: list[str] = []
    want_kid = settings.kid and reference is not None
    if want_kid and reference.kind == "stats":
        warnings.append("KID skipped: the reference is a statistics file, and KID needs the reference "
                        "images' features")
        want_kid = False
    if generated.kind == "stats" and (settings.isc or want_kid):
        warnings.append("IS and KID skipped: the generated side is a statistics file")
        want_kid = False
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdbatch-metrics-") as tmp:
        sides = []
        for name, src in (("generated", generated), ("reference", reference)):
            if src is None or src.kind == "stats":
                continue
            side = Side(src, readable=np.zeros(src.count, dtype=bool))
            if want_kid:
                side.features = _memmap(tmp, f"{name}-features.npy", src.count, FEATURE_DIM)
            if name == "generated" and settings.isc:
                side.logits = _memmap(tmp, f"{name}-logits.npy", src.count, NUM_CLASSES)
            sides.append((name, side))
        if collected is not None:
            collected.fill(sides[0][1])
        device = "the generation actors' device" if collected is not None else None
        if any((~s.readable).any() for _, s in sides):
            device = extract_on_ray([(s, s.features is not None, s.logits is not None) for _, s in sides],
                                    weights, workers, settings.batch_size, settings.threads,
                                    settings.shard_size)
        by_name = dict(sides)
        images = {name: s.counts() for name, s in sides}
        for name, s in sides:
            if s.stats.n < FEATURE_DIM and (settings.fid or save_stats_to):
                warnings.append(f"{name}: {s.stats.n} images, fewer than the {FEATURE_DIM} feature dimensions: "
                                f"the covariance is rank-deficient and FID is unreliable (biased high); "
                                f"published FIDs use 10,000-50,000 images")
            if s.errors:
                print(f"{name}: {len(s.errors)} of {s.source.count} images could not be read, e.g. "
                      f"{s.errors[0][0]}: {s.errors[0][1]}", file=sys.stderr)
        stats = {name: s.stats.mu_sigma(f"the {name} images") for name, s in sides
                 if settings.fid or save_stats_to}
        for name, src in (("generated", generated), ("reference", reference)):
            if src is not None and src.kind == "stats":
                stats[name] = (src.stats["mu"], src.stats["sigma"])
                images[name] = {"source": src.uri, "statistics_of": src.stats["n"]}
                if src.stats["inception_sha256"] not in (None, weights.sha256):
                    warnings.append(f"{src.uri} was computed with other Inception weights "
                                    f"(sha256 {src.stats['inception_sha256'][:12]}...)")
        if save_stats_to:
            save_stats(save_stats_to, *stats["generated"], by_name["generated"].stats.n, weights.sha256)
        if settings.fid and reference is not None:
            report["frechet_inception_distance"] = frechet_distance(*stats["generated"], *stats["reference"])
        gen = by_name.get("generated")
        if gen is not None and gen.logits is not None:
            report.update(_isc(gen, settings, warnings))
        if want_kid:
            report.update(_kid(gen, by_name["reference"], settings, warnings))
    report["images"] = images
    unreadable = [{"side": name, "image": n, "error": e} for name, s in sides for n, e in s.errors]
    if unreadable:
        report["unreadable"] = unreadable[:MAX_LISTED_ERRORS]
    report["settings"] = {
        "feature_extractor": f"torch-fidelity {_version('torch-fidelity')} FeatureExtractorInceptionV3 "
                             "('2048' for FID/KID, 'logits_unbiased' for IS)",
        "inception_weights": weights.source, "inception_weights_sha256": weights.sha256,
        "official_weights": weights.official, "isc_splits": settings.isc_splits, "samples_shuffle": True,
        "rng_seed": settings.seed, "kid_subsets": settings.kid_subsets,
        "kid_subset_size": report.pop("_kid_subset_size", settings.kid_subset_size),
        "kid_kernel": "poly (degree 3, gamma 1/2048, coef0 1)", "device": device,
    }
    if not weights.official:
        warnings.append("the Inception weights are not the official pt_inception-2015-12-05 file: "
                        "the numbers are not comparable with published ones")
    report["warnings"] = warnings
    return report


def _isc(gen: Side, settings: Settings, warnings: list[str]) -> dict[str, float]:
    rows = np.flatnonzero(gen.readable)
    if len(rows) < settings.isc_splits:
        warnings.append(f"IS skipped: {len(rows)} readable images for {settings.isc_splits} splits")
        return {}
    split = split_of_rank(len(rows), settings.isc_splits, settings.seed)
    chunk = 4096
    chunks = ((gen.logits[rows[i:i + chunk]], split[i:i + chunk]) for i in range(0, len(rows), chunk))
    mean, std = inception_score(chunks, settings.isc_splits)
    return {"inception_score_mean": mean, "inception_score_std": std}


def _kid(gen: Side, ref: Side, settings: Settings, warnings: list[str]) -> dict[str, float]:
    f1 = _Rows(gen.features, np.flatnonzero(gen.readable))
    f2 = _Rows(ref.features, np.flatnonzero(ref.readable))
    size = settings.kid_subset_size
    if min(len(f1), len(f2)) < size:
        size = min(len(f1), len(f2))
        warnings.append(f"KID subset size lowered from {settings.kid_subset_size} to {size}, the number of "
                        f"readable images on the smaller side")
    if size < 2:
        warnings.append("KID skipped: fewer than 2 readable images on a side")
        return {}
    mean, std = kernel_inception_distance(f1, f2, settings.kid_subsets, size, settings.seed)
    return {"kernel_inception_distance_mean": mean, "kernel_inception_distance_std": std,
            "_kid_subset_size": size}


class _Rows:
    """The readable rows of a memory-mapped feature file, indexable by readable rank."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        return self.array[self.rows[idx]]


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


class RunFeatures:
    """`run --metrics`: the Inception features of the images a run generates, computed by the
    generation actors while each image is in memory and kept here in arrival order
    (memory-mapped, 12 KiB per image on disk), so that the metrics need not read them back."""

    COLUMNS = ("inception_features", "inception_logits")

    def __init__(self, inception_weights: str | None, reference: str | None, capacity: int):
        if not reference:
            raise MetricsError("--metrics needs --reference REF (reference images or .npz statistics)")
        self.weights = load_inception_weights(resolve_inception_weights(inception_weights))
        self.reference = open_source(reference)  # checked before any image is generated
        self._tmp = tempfile.TemporaryDirectory(prefix="sdbatch-run-features-")
        self.features = _memmap(self._tmp.name, "features.npy", max(capacity, 1), FEATURE_DIM)
        self.logits = _memmap(self._tmp.name, "logits.npy", max(capacity, 1), NUM_CLASSES)
        self.uris: list[str] = []
        self._seen: set[str] = set()
        self._ref: list | None = None

    def actor_weights(self) -> list:
        """[object ref of the weights], for GenerationActor(inception_weights=...)."""
        import ray

        if self._ref is None:
            self._ref = [ray.put(self.weights.state_dict)]
        return self._ref

    def take(self, block):
        """Keeps the features of a block of generation results; returns the block without them."""
        images = block.column("image").to_pylist()
        features, logits = (block.column(c) for c in self.COLUMNS)
        for i, uri in enumerate(images):
            if uri is None or not features[i].is_valid or uri in self._seen:  # failed, or delivered twice
                continue
            self._seen.add(uri)
            row = len(self.uris)
            self.features[row] = features[i].values.to_numpy()
            self.logits[row] = logits[i].values.to_numpy()
            self.uris.append(uri)
        return block.drop_columns(list(self.COLUMNS))

    def fill(self, side: Side) -> None:
        """Copies the features of the side's images that this run generated into it."""
        rank = {uri: r for r, uri in enumerate(side.source.uris)}
        rows = np.array([i for i, uri in enumerate(self.uris) if uri in rank], dtype=np.int64)
        for i in range(0, len(rows), 4096):
            chunk = rows[i:i + 4096]
            ranks = np.array([rank[self.uris[j]] for j in chunk], dtype=np.int64)
            stats, features = FidStats(), self.features[chunk]
            stats.add(features)
            side.record(ranks, stats, features, self.logits[chunk])

    def close(self) -> None:
        self._tmp.cleanup()


def metrics_after_run(out: str, collected: RunFeatures, address: str | None = None) -> dict[str, Any]:
    """`run --metrics`: metrics of every image OUT's manifest lists against the reference, with
    the default settings; writes OUT/metrics.json and prints it."""

    try:
        with ray_session(address):
            report = compute_metrics(open_source(out), collected.reference, collected.weights, Settings(),
                                     collected=collected)
    finally:
        collected.close()
    _publish(report, storage.join(out, "metrics.json"))
    return report


def _publish(report: dict[str, Any], target: str | None) -> None:
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if target:
        fs, path = storage.url_to_fs(target)
        storage.write_bytes(fs, path, text.encode() + b"\n")
        print(f"wrote {target}", file=sys.stderr)


# ----------------------------------------------------------------------------- command line


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="OUT",
                        help="a job's output folder (its manifest's images), or any folder/URI of images, "
                             "Parquet table of images or .npz statistics file")
    parser.add_argument("--reference", metavar="REF",
                        help="reference images: folder/URI, Parquet table, another job's OUT, or .npz "
                             "statistics (mu, sigma: FID only)")
    parser.add_argument("--save-stats", metavar="NPZ", help="save OUT's FID statistics (mu, sigma) to this .npz")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help=f"weights file (default: ${WEIGHTS_ENV}, else the cache, else downloaded)")
    parser.add_argument("--workers", type=int, default=None,
                        help="feature actors (default: one per GPU; one on a CPU-only cluster)")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size,
                        help="images per Inception forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per CPU actor (default: the CPUs split across the actors)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="images per actor task (default: about 4 tasks per actor, 16-2048 images)")
    parser.add_argument("--metrics", default="fid,isc,kid", help="comma-separated subset of fid,isc,kid "
                        "(default: all three; KID needs reference images, not statistics)")
    parser.add_argument("--isc-splits", type=int, default=Settings.isc_splits, help="(default: %(default)s)")
    parser.add_argument("--kid-subsets", type=int, default=Settings.kid_subsets, help="(default: %(default)s)")
    parser.add_argument("--kid-subset-size", type=int, default=Settings.kid_subset_size,
                        help="(default: %(default)s; lowered, with a warning, to the smaller side's count)")
    parser.add_argument("--seed", type=int, default=Settings.seed,
                        help="torch-fidelity's rng_seed, for the IS shuffle and the KID subsets (default: %(default)s)")
    parser.add_argument("--image-column", default="image", help="a Parquet table's image column "
                        "(URIs, encoded bytes, or {bytes, path} structs)")
    parser.add_argument("--json", metavar="PATH", help="where to write metrics.json (default: OUT/metrics.json)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def metrics_command(args: argparse.Namespace) -> int:

    chosen = {m.strip() for m in args.metrics.split(",") if m.strip()}
    if not chosen <= {"fid", "isc", "kid"}:
        raise MetricsError(f"--metrics {args.metrics}: choose from fid, isc, kid")
    for name in ("workers", "threads", "shard_size", "isc_splits", "kid_subsets", "kid_subset_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MetricsError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.reference and not args.save_stats:
        raise MetricsError("give --reference REF (to compare with) or --save-stats NPZ (to save OUT's statistics)")
    settings = Settings(isc_splits=args.isc_splits, kid_subsets=args.kid_subsets,
                        kid_subset_size=args.kid_subset_size, seed=args.seed, batch_size=args.batch_size,
                        threads=args.threads, shard_size=args.shard_size,
                        fid="fid" in chosen, isc="isc" in chosen and bool(args.reference),
                        kid="kid" in chosen)
    generated = open_source(args.images, args.image_column)
    reference = open_source(args.reference, args.image_column) if args.reference else None
    if args.save_stats and generated.kind == "stats":
        raise MetricsError(f"{args.images} is already a statistics file")
    weights = load_inception_weights(resolve_inception_weights(args.inception_weights))
    needs_ray = generated.kind != "stats" or (reference and reference.kind != "stats")
    with ray_session(args.address) if needs_ray else contextlib.nullcontext():
        report = compute_metrics(generated, reference, weights, settings, args.workers, args.save_stats)
    if args.save_stats:
        print(f"saved FID statistics of {report['images']['generated']['used']} images to {args.save_stats} "
              f"(usable as --reference for FID; KID needs the images)", file=sys.stderr)
    if not args.reference:
        for warning in report["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    _publish(report, args.json or (storage.join(args.images, "metrics.json")
                                   if generated.kind in ("job", "folder") else None))
    return 0
