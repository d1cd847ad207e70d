"""FID, Inception Score and KID as pure functions of Inception features, equal to torch-fidelity.

FID needs only sufficient statistics (n, sum x, sum x x^T in float64), so shards computed
apart are merged by adding them. IS and KID take the per-image logits / features.
The network and the image sources are in `sdbatch.inception`; the Ray job in `sdbatch.jobs.metrics`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from sdbatch import storage
from sdbatch.errors import JobError

FEATURE_DIM = 2048
NUM_CLASSES = 1008


class MetricsError(JobError):
    """Bad input to the metrics command: reported as `error: ...`, nothing computed."""


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
