"""The FID InceptionV3 network, its weights, the image sources it reads, and the per-shard
feature extraction that `sdbatch.actors.InceptionFeatureActor` runs (no Ray here).

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-ported InceptionV3 with
the pt_inception-2015-12-05 weights that published FIDs use), fed uint8 images. A shard gives
the float64 sufficient statistics of its 2048-d pool features (`sdbatch.metrics.FidStats`) and,
when asked, each readable image's float32 features (KID) and logits (IS).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import sys
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdbatch import storage
from sdbatch.metrics import FEATURE_DIM, NUM_CLASSES, FidStats, MetricsError, load_stats

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name for the network
WEIGHTS_ENV = "SDBATCH_INCEPTION_WEIGHTS"
WEIGHTS_URL_ENV = "SDBATCH_INCEPTION_URL"   # a mirror, for clusters without internet access
DOWNLOAD_TIMEOUT_S = 60


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
    """Lists a folder of images, a Parquet table of images or a .npz statistics file (a job's OUT,
    the images its manifest lists: `sdbatch.jobs.metrics.open_source`).

    Order: folder images sorted by URI (a folder therefore in torch-fidelity's order),
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
    files = sorted(storage.retry(fs.find, path))
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if images:
        return Source(uri, "folder", uris=[storage.to_uri(fs, f) for f in images])
    tables = [f for f in files if f.endswith(".parquet") and not os.path.basename(f).startswith((".", "_"))]
    if tables:
        return _table_source(uri, fs, tables, image_column)
    raise MetricsError(f"{uri} holds no images ({', '.join(IMAGE_EXTENSIONS)}), Parquet files or job manifest")


def resolve_uri(fs, folder: str, uri: str) -> str:
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
            v = resolve_uri(fs, folder, v)
        items.append((f"{file_uri} row {row}", v))
    return items


def read_image(item: Any) -> np.ndarray:
    """uint8 (H, W, 3) RGB from a URI or encoded bytes, read as a viewer shows it
    (`sdbatch.images.read_image`: EXIF orientation, transparency onto white, first frame). For
    plain RGB files this is torch-fidelity's PIL `.convert('RGB')`, pixel for pixel.
    Raises ValueError (ImageReadError) naming the image when it cannot be read correctly."""
    from sdbatch.images import read_image as read_rgb

    if item is None:
        raise ValueError("no image (null)")
    name = item if isinstance(item, str) else None
    if isinstance(item, str):
        fs, path = storage.url_to_fs(item)
        item = storage.read_bytes(fs, path)
    return np.asarray(read_rgb(item, name=name))


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
