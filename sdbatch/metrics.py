"""Quality metrics of a job's images: FID, Inception Score and KID, on Ray, equal to torch-fidelity.

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
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from sdbatch import storage
from sdbatch.jobs import JobError

FEATURE_DIM = 2048
NUM_CLASSES = 1008
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name for the network
WEIGHTS_ENV = "SDBATCH_INCEPTION_WEIGHTS"
WEIGHTS_URL_ENV = "SDBATCH_INCEPTION_URL"   # a mirror, for clusters without internet access
DOWNLOAD_TIMEOUT_S = 60
MAX_LISTED_ERRORS = 100


class MetricsError(JobError):
    """Bad input to the metrics command: reported as `error: ...`, nothing computed."""


# ----------------------------------------------------------------------------- Inception weights


def official_weights() -> tuple[str, str, str]:
    """(url, file name, sha256 prefix) of the official weights, as torch-fidelity names them.

    The prefix is the one torch.hub checks: the hex digits between the last '-' and '.pth'.
    pytorch-fid publishes the same tensors as pt_inception-2015-12-05-<same prefix>.pth."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    url = os.environ.get(WEIGHTS_URL_ENV) or URL_INCEPTION_V3
    name = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return url, name, re.search(r"-([0-9a-f]{8,})\.pth$", name).group(1)


def weights_cache_dir() -> str:
    """$SDBATCH_CACHE/inception (default ~/.cache/sdbatch/inception), beside the model cache."""
    from sdbatch.model.weights import cache_dir

    return os.path.join(cache_dir(), "inception")


def _is_official_name(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].endswith(f"2015-12-05-{official_weights()[2]}.pth")


def resolve_inception_weights(path: str | None = None) -> str:
    """The weights file to use: `path`, else $SDBATCH_INCEPTION_WEIGHTS, else the cache folder
    (or torch.hub's, where torch-fidelity itself keeps it), else a download into the cache."""
    import torch

    explicit = path or os.environ.get(WEIGHTS_ENV)
    if explicit:
        fs, p = storage.url_to_fs(explicit)
        if not storage.exists(fs, p):
            origin = "--inception-weights" if path else f"${WEIGHTS_ENV}"
            raise MetricsError(f"{origin} {explicit} does not exist")
        return explicit
    url, name, prefix = official_weights()
    target = os.path.join(weights_cache_dir(), name)
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    for candidate in (target, os.path.join(hub, name), os.path.join(hub, f"pt_inception-2015-12-05-{prefix}.pth")):
        if os.path.isfile(candidate):
            return candidate
    try:
        _download(url, target)
    except OSError as exc:
        raise MetricsError(
            f"the FID InceptionV3 weights are missing and could not be downloaded from {url} ({exc}).\n"
            f"Get the file {name} (pytorch-fid's pt_inception-2015-12-05-{prefix}.pth is the same "
            f"file) and put it at {target}, or pass --inception-weights PATH, or set {WEIGHTS_ENV}=PATH."
        ) from exc
    return target


def _download(url: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.partial-{os.getpid()}"
    print(f"downloading the FID InceptionV3 weights from {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(partial, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@dataclass
class InceptionWeights:
    source: str
    sha256: str
    official: bool
    state_dict: dict = field(repr=False)


def load_inception_weights(source: str) -> InceptionWeights:
    """Reads a weights file (path or URI) without running pickled code (weights_only=True).
    A file named like the official one must carry its hash."""
    import torch

    fs, path = storage.url_to_fs(source)
    data = storage.read_bytes(fs, path)
    sha = hashlib.sha256(data).hexdigest()
    prefix = official_weights()[2]
    if _is_official_name(path) and not sha.startswith(prefix):
        raise MetricsError(f"{source} is named like the official FID InceptionV3 weights but its sha256 "
                           f"is {sha}, not {prefix}...: the file is damaged or not the official one; "
                           f"delete it and fetch it again")
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricsError(f"{source} is not a plain PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state_dict, dict):
        raise MetricsError(f"{source} holds a {type(state_dict).__name__}, not a state dict")
    return InceptionWeights(source, sha, sha.startswith(prefix), state_dict)


def build_inception(state_dict: dict, device: str = "cpu"):
    """torch-fidelity's InceptionV3 with the given weights, giving ('2048', 'logits_unbiased').

    torch-fidelity's constructor can only load weights by unpickling a file with
    weights_only=False, so it gets bytes we serialized ourselves from plain tensors."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    try:
        model = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=buf)
    except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise MetricsError(f"the weights are not torch-fidelity's InceptionV3: {str(exc)[:500]}") from exc
    return model.to(device)


def save_random_inception_weights(path: str, seed: int = 0) -> str:
    """Writes random InceptionV3 weights in the official file's format (a torch.save'd state
    dict with torch-fidelity's keys): for tests and smoke runs, its numbers mean nothing.

    Random layers alone would map every image to nearly the same features, so the
    BatchNorm statistics are those of a batch of noise and colour-ramp images (each layer's
    output then varies with the input) and the classifier sees only how an image's features differ from
    that batch's mean, scaled to logits of standard deviation about 2 (an IS well above 1)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # only the structure is wanted here

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    model = _Unloaded(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 4:
                p.copy_(torch.randn(p.shape, generator=g) * (2 / p[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # running stats = this one batch's statistics
        model.train()
        noise = torch.randint(0, 256, (4, 3, 32, 32), generator=g).float()
        ramp = torch.linspace(0, 1, 32)
        slopes = torch.rand(4, 3, 3, 1, 1, generator=g) * 4
        smooth = (slopes[:, :, 0] * ramp[:, None] + slopes[:, :, 1] * ramp[None, :] + slopes[:, :, 2]) % 1 * 255
        images = torch.cat([noise, smooth]).to(torch.uint8)
        (features,) = model(images)
        centred = features - features.mean(dim=0)
        w = torch.randn(model.fc.weight.shape, generator=g)
        mean_dir = features.mean(dim=0) / features.mean(dim=0).norm()
        w -= (w @ mean_dir)[:, None] * mean_dir[None, :]
        w *= 2 / (centred @ w.T).std()
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=g))
    torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- statistics


@dataclass
class FidStats:
    """Sufficient statistics of features: count, sum and sum of outer products (float64)."""

    n: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(FEATURE_DIM))
    outer: np.ndarray = field(default_factory=lambda: np.zeros((FEATURE_DIM, FEATURE_DIM)))

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def merge(self, other: "FidStats") -> None:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer

    def mu_sigma(self, what: str = "the images") -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise MetricsError(f"FID statistics need at least 2 readable images; {what} have {self.n}")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, n: int, weights_sha256: str) -> None:
    """pytorch-fid / clean-fid format (`mu`, `sigma`) plus the count and the weights' sha256."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=np.int64(n), inception_sha256=np.str_(weights_sha256))
    fs, p = storage.url_to_fs(path)
    storage.write_bytes(fs, p, buf.getvalue())


def load_stats(path: str) -> dict[str, Any]:
    fs, p = storage.url_to_fs(path)
    if not storage.exists(fs, p):
        raise MetricsError(f"statistics file {path} does not exist")
    try:
        with np.load(io.BytesIO(storage.read_bytes(fs, p)), allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except Exception as exc:
        raise MetricsError(f"{path} is not a readable .npz file ({exc})") from exc
    for key, shape in (("mu", (FEATURE_DIM,)), ("sigma", (FEATURE_DIM, FEATURE_DIM))):
        if key not in stats:
            raise MetricsError(f"{path} has no '{key}' array (it has: {', '.join(stats) or 'nothing'})")
        if stats[key].shape != shape:
            raise MetricsError(f"{path}: '{key}' has shape {stats[key].shape}, expected {shape} "
                               f"(the 2048-d InceptionV3 pool features)")
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64),
            "n": int(stats["n"]) if "n" in stats else None,
            "inception_sha256": str(stats["inception_sha256"]) if "inception_sha256" in stats else None}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                    verbose=False)[KEY_METRIC_FID]


def split_of_rank(n: int, splits: int, seed: int) -> np.ndarray:
    """The IS split of each of n images, as torch-fidelity assigns them: image q lands at
    position inv[q] of RandomState(seed).permutation(n), and the splits are the contiguous
    chunks [i*n//splits, (i+1)*n//splits) of the permuted order."""
    position = np.empty(n, dtype=np.int64)
    position[np.random.RandomState(seed).permutation(n)] = np.arange(n)
    bounds = np.array([(i + 1) * n // splits for i in range(splits)])
    return np.searchsorted(bounds, position, side="right")


def inception_score(logit_chunks: Iterator[tuple[np.ndarray, np.ndarray]], splits: int) -> tuple[float, float]:
    """IS mean and std from (logits float32 (k, 1008), split ids (k,)) chunks.

    Per split only the count, the sum of p and the sum of p log p are kept, since
    mean_i KL(p_i || q) = mean_i sum_c p_ic log p_ic - sum_c q_c log q_c with q the split's mean p."""
    import torch

    count = np.zeros(splits)
    sum_p = np.zeros((splits, NUM_CLASSES))
    sum_plogp = np.zeros(splits)
    for logits, split in logit_chunks:
        x = torch.from_numpy(np.asarray(logits)).double()
        p, log_p = x.softmax(dim=1).numpy(), x.log_softmax(dim=1).numpy()
        plogp = (p * log_p).sum(axis=1)
        for s in np.unique(split):
            rows = split == s
            count[s] += rows.sum()
            sum_p[s] += p[rows].sum(axis=0)
            sum_plogp[s] += plogp[rows].sum()
    q = sum_p / count[:, None]
    scores = np.exp(sum_plogp / count - (q * np.log(q)).sum(axis=1))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(features_1, features_2, subsets: int, subset_size: int,
                              seed: int) -> tuple[float, float]:
    """KID as torch-fidelity computes it (polynomial kernel, unbiased MMD^2), from two row-indexable
    float32 feature arrays (memory maps are fine: each subset reads subset_size rows of each)."""
    from torch_fidelity.metric_kid import kernel_mmd

    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        idx_1 = rng.choice(len(features_1), subset_size, replace=False)
        idx_2 = rng.choice(len(features_2), subset_size, replace=False)
        mmds[i] = kernel_mmd(np.asarray(features_1[idx_1]), np.asarray(features_2[idx_2]))
    return float(np.mean(mmds)), float(np.std(mmds))


# ----------------------------------------------------------------------------- image sources


@dataclass
class Source:
    """Where images come from. kind: job (OUT's manifest), folder, table (Parquet), stats (.npz).
    Images are listed as `uris`, or as Parquet files with their row counts (`tables`)."""

    uri: str
    kind: str
    uris: list[str] = field(default_factory=list)
    tables: list[tuple[str, str, int]] = field(default_factory=list)  # (file URI, column, rows)
    stats: dict[str, Any] | None = None

    @property
    def count(self) -> int:
        return len(self.uris) + sum(rows for _, _, rows in self.tables)

    def shards(self, size: int) -> list[tuple[int, tuple]]:
        """(index of the first image, spec) pairs; spec is ("uris", [uri, ...]) or
        ("table", file URI, column, first row, end row)."""
        out = [(i, ("uris", self.uris[i:i + size])) for i in range(0, len(self.uris), size)]
        start = 0
        for file_uri, column, rows in self.tables:
            out += [(start + a, ("table", file_uri, column, a, min(rows, a + size))) for a in range(0, rows, size)]
            start += rows
        return out


def open_source(uri: str, image_column: str = "image") -> Source:
    """Lists a job's OUT, a folder of images, a Parquet table of images or a .npz statistics file.

    Order: job and folder images sorted by URI (a folder therefore in torch-fidelity's order),
    a table's rows in table order (files sorted by name)."""
    if uri.endswith(".npz"):
        return Source(uri, "stats", stats=load_stats(uri))
    fs, path = storage.url_to_fs(uri)
    if not storage.exists(fs, path):
        raise MetricsError(f"{uri} does not exist")
    if not storage.retry(fs.isdir, path):
        if path.endswith(".parquet"):
            return _table_source(uri, fs, [path], image_column)
        raise MetricsError(f"{uri} is not a folder of images, a job's output, a Parquet table or a .npz file")
    if storage.exists(fs, storage.join(path, "manifest")):
        uris = _manifest_images(uri, fs, path)
        if not uris:
            raise MetricsError(f"{uri}: the job's manifest lists no images")
        return Source(uri, "job", uris=sorted(uris))
    files = sorted(storage.retry(fs.find, path))
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if images:
        return Source(uri, "folder", uris=[storage.to_uri(fs, f) for f in images])
    tables = [f for f in files if f.endswith(".parquet") and not os.path.basename(f).startswith((".", "_"))]
    if tables:
        return _table_source(uri, fs, tables, image_column)
    raise MetricsError(f"{uri} holds no images ({', '.join(IMAGE_EXTENSIONS)}), Parquet files or job manifest")


def _manifest_images(uri: str, fs, root: str) -> list[str]:
    uris = []
    for part in storage.list_files(fs, storage.join(root, "manifest"), ".parquet"):
        column = storage.read_parquet(fs, part, columns=["image"]).column("image").to_pylist()
        uris += [_resolve(fs, root, u) for u in column if u]
    return uris


def _resolve(fs, folder: str, uri: str) -> str:
    """A URI as written in a table: absolute ones as they are, relative ones from `folder`."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return storage.to_uri(fs, storage.join(folder, uri))


def _table_source(uri: str, fs, files: list[str], column: str) -> Source:
    import pyarrow.parquet as pq

    source = Source(uri, "table")
    for path in files:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            names, rows = meta.schema_arrow.names, meta.metadata.num_rows
        if column not in names:
            raise MetricsError(f"{storage.to_uri(fs, path)} has no '{column}' column (its columns: "
                               f"{', '.join(names)}); choose one with --image-column")
        source.tables.append((storage.to_uri(fs, path), column, rows))
    if not source.count:
        raise MetricsError(f"{uri}: the table has no rows")
    return source


def auto_shard_size(images: int, actors: int) -> int:
    """About 4 shards per actor (so fast actors take more), 16 to 2048 images each: every
    shard sends back 32 MiB of statistics besides its features."""
    return max(16, min(2048, math.ceil(images / (4 * actors))))


def shard_items(spec: tuple) -> list[tuple[str, Any]]:
    """(name for error messages, what to read) for each image of a shard spec."""
    if spec[0] == "uris":
        return [(u, u) for u in spec[1]]
    _, file_uri, column, first, end = spec
    fs, path = storage.url_to_fs(file_uri)
    values = storage.read_parquet(fs, path, columns=[column]).column(column).slice(first, end - first).to_pylist()
    folder = path.rsplit("/", 1)[0]
    items = []
    for row, v in enumerate(values, start=first):
        if isinstance(v, dict):  # the Hugging Face datasets Image struct: {bytes, path}
            v = v.get("bytes") or v.get("path")
        if isinstance(v, str):
            v = _resolve(fs, folder, v)
        items.append((f"{file_uri} row {row}", v))
    return items


def read_image(item: Any) -> np.ndarray:
    """uint8 (H, W, 3) RGB from a URI or encoded bytes (converted like torch-fidelity: PIL .convert('RGB'))."""
    from PIL import Image

    if item is None:
        raise ValueError("no image (null)")
    if isinstance(item, str):
        fs, path = storage.url_to_fs(item)
        item = storage.read_bytes(fs, path)
    with Image.open(io.BytesIO(item)) as im:
        return np.asarray(im.convert("RGB"))


def _prefetch(items: list[tuple[str, Any]], threads: int = 8, window: int = 64):
    """Reads images on a few threads, in order, at most `window` ahead: (name, array or exception)."""

    def load(item):
        try:
            return read_image(item)
        except Exception as exc:  # reported per image, never fatal
            return exc

    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for name, item in items:
            pending.append((name, pool.submit(load, item)))
            if len(pending) >= window:
                n, fut = pending.popleft()
                yield n, fut.result()
        while pending:
            n, fut = pending.popleft()
            yield n, fut.result()


# ----------------------------------------------------------------------------- per-shard work


def extract_arrays(model, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(pool features float32 (B, 2048), logits float32 (B, 1008)) of same-size uint8 HWC images."""
    import torch

    device = next(model.parameters()).device
    # NCHW-contiguous like torch-fidelity's loader: a channels-last view would pick other kernels.
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device)
    # TF32 would move the features away from the reference numbers; restored afterwards, since
    # a generation actor runs its U-Net in the same process.
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            features, logits = model(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return features.cpu().numpy(), logits.cpu().numpy()


def extract_shard(model, spec: tuple, batch_size: int, keep_features: bool, keep_logits: bool) -> dict[str, Any]:
    """One shard's contribution: FID statistics, and (if asked) each readable image's features
    and logits, in shard order; `ok` is the position in the shard of each readable image."""
    stats = FidStats()
    ok, errors, features, logits = [], [], [], []
    batch, positions = [], []

    def flush():
        if batch:
            f, lg = extract_arrays(model, batch)
            stats.add(f)
            ok.extend(positions)
            features.append(f)
            logits.append(lg)
            batch.clear()
            positions.clear()

    for pos, (name, image) in enumerate(_prefetch(shard_items(spec))):
        if isinstance(image, Exception):
            errors.append((name, f"{type(image).__name__}: {image}"))
            continue
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(image)
        positions.append(pos)
    flush()
    cat = lambda parts, dim: np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return {"ok": np.asarray(ok, dtype=np.int64), "errors": errors, "stats": stats,
            "features": cat(features, FEATURE_DIM) if keep_features else None,
            "logits": cat(logits, NUM_CLASSES) if keep_logits else None}


# ----------------------------------------------------------------------------- the driver


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
    from sdbatch.jobs import actor_pool

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
    from sdbatch.jobs import ray_session

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
    from sdbatch.jobs import ray_session

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
