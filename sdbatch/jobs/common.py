"""What every job kind shares: the Ray session, actor pools sized from the cluster, progress
lines and the run record's versions and times."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sdbatch import storage
from sdbatch.errors import JobError


class Progress:
    """`rows done/total | images/s | ETA` on stderr: redrawn on a terminal, a line every 10 s
    in a log (as under `ray job submit`)."""

    def __init__(self, total: int, done: int, errors: int = 0, stream=None):
        """done: rows already recorded (images or errors), of which `errors` are errors."""
        self.total, self.done, self.errors, self.new = total, done, errors, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.show(force=True)

    def update(self, ok: int, err: int) -> None:
        self.done += ok + err
        self.new += ok
        self.errors += err
        self.show()

    def show(self, force: bool = False, end: str = "") -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 10):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.new / elapsed
        left = self.total - self.done
        eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        line = (f"rows {self.done}/{self.total} ({self.errors} errors) | "
                f"{rate:.2f} images/s | ETA {eta}")
        self.stream.write(("\r" + line + end) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.show(force=True, end="\n")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("sdbatch", "torch", "ray", "pyarrow", "numpy", "pillow", "fsspec", "s3fs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connected to Ray for the block: the one already initialised, RAY_ADDRESS / --address, or a
    local Ray started for the block and shut down after it."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_ray_logs()
    ray.init(address=address or "local", logging_level="ERROR", log_to_driver=True)
    try:
        with native_stderr_to(os.path.join(ray._private.worker._global_node.get_logs_dir_path(),
                                           f"sdbatch-driver-{os.getpid()}.err")):
            yield
    finally:
        if not address:
            ray.shutdown()


def quiet_ray_logs() -> None:
    """Keep Ray's Python notices (the token notice, Ray Data's progress-bar and execution notes)
    off the user's terminal; Ray's log folder keeps its own logs. sdbatch's progress, the
    exceptions of failed tasks and the actors' own messages (log_to_driver) still show."""
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import: set the levels after that)

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.data."):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def native_stderr_to(path: str) -> Iterator[None]:
    """For the block, what native code writes to file descriptor 2 (Ray's C++ core worker copies
    its error lines there, e.g. "constructor arguments in the object store") goes to `path` in
    Ray's log folder, while Python's sys.stderr (progress, errors) still goes to the terminal."""
    python_stderr = sys.stderr
    python_stderr.flush()
    try:
        on_fd2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a capture object: leave it as it is
        on_fd2 = False
    try:
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        yield
        return
    saved = os.dup(2)
    if on_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding or "utf-8",
                               errors="backslashreplace")
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if on_fd2:
            sys.stderr.close()
            sys.stderr = python_stderr


def workers_option(value: str) -> str:
    """argparse type of --workers: a positive integer or 'auto'."""
    import argparse

    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError("must be a positive integer or 'auto'")
    return value


@dataclass
class Pool:
    min_size: int
    max_size: int | None  # None: no bound known, Ray Data grows the pool as the cluster grows
    num_gpus: float
    num_cpus: float
    threads: int


def actor_pool(workers: str | None, gpus_per_worker: float | None) -> Pool:
    """Actor count and resources from the cluster: one actor per `gpus_per_worker` GPUs, or on
    a cluster without GPUs, CPU actors whose torch threads add up to the CPUs (never more).
    `--workers auto` gives an autoscaling pool from 1 to what the cluster has or can add."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), res.get("GPU", 0)
    can_add = _max_cluster_resources()
    max_gpus = max(gpus, (can_add or {}).get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if max_gpus else 0.0
    if gpus_per_worker > 0:
        if not max_gpus and can_add is not None:
            raise JobError(f"--gpus-per-worker {gpus_per_worker:g} but the cluster has no GPUs")
        now = max(1, int(gpus // gpus_per_worker))
        threads = max(1, min(4, cpus // now))
        if workers == "auto":
            most = None if can_add is None else max(1, int(max_gpus // gpus_per_worker))
            return Pool(1, most, gpus_per_worker, 1, threads)
        n = int(workers) if workers else now
        return Pool(n, n, gpus_per_worker, 1, threads)
    if workers == "auto":
        threads = min(cpus, 4)
        most = max(1, max(cpus, int((can_add or {}).get("CPU", 0))) // threads)
        return Pool(1, most, 0, threads, threads)
    n = int(workers or 1)
    if n > cpus:
        print(f"note: {n} CPU workers on {cpus} CPUs; using {cpus}", file=sys.stderr)
        n = cpus
    threads = max(1, cpus // n)
    return Pool(n, n, 0, threads, threads)


def _max_cluster_resources() -> dict[str, float] | None:
    """What an autoscaling cluster can grow to: {} without an autoscaler, None if one runs
    but its limits are unknown.

    KubeRay reports its node types to the GCS. Ray's cluster launcher (`ray up`) doesn't, but
    leaves them in ~/ray_bootstrap_config.yaml on the head, where `ray job submit` runs us.
    """
    import ray._private.state
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # not every Ray deployment reports a cluster config
        limits = None
    if limits:
        return limits
    bootstrap = os.path.expanduser("~/ray_bootstrap_config.yaml")
    if os.path.exists(bootstrap):
        import yaml

        with open(bootstrap) as f:
            config = yaml.safe_load(f)
        totals: dict[str, float] = {}
        for name, node_type in config["available_node_types"].items():
            count = 1 if name == config["head_node_type"] else node_type.get("max_workers", 0)
            for resource, amount in node_type.get("resources", {}).items():
                totals[resource] = totals.get(resource, 0) + amount * count
        return totals
    # The monitor's status names each node's type; without an autoscaling config (a local
    # Ray, `ray start --head`) every node has the read-only provider's anonymous type.
    status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}")
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    managed = any(t != format_readonly_node_type(node) for node, t in types.items())
    return None if managed else {}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_model(model: str, option: str = "--model") -> tuple[str, str | None]:
    """The model source the actors get, and its sha256 when it is local, checked before anything
    starts. A relative path is made absolute here, on the driver (under `ray job submit` that is the
    uploaded --working-dir, which leaves out what .gitignore ignores). Raises JobError naming the
    input (`option`) and the reason. A built-in model (`builtin:NAME`) stays so named: each node
    finds it in its own install of sdbatch."""
    from sdbatch.builtin import BuiltinModelError, builtin_path, is_builtin
    from sdbatch.model.weights import CheckpointError, check_checkpoint, checkpoint_hash

    if is_builtin(model):
        try:
            return model, checkpoint_hash(builtin_path(model))
        except BuiltinModelError as exc:
            raise JobError(f"{option} {exc}") from None

    protocol, _, rest = model.partition("://")
    if rest and protocol not in ("file", "local"):
        fs, path = storage.url_to_fs(model)
        if not storage.exists(fs, path):
            raise JobError(f"{option} {model}: not found")
        return model, None
    given = Path(rest or model).expanduser()
    path = given.resolve()
    where = "" if given.is_absolute() else f" (relative to {os.getcwd()}, where the job runs)"
    if not path.exists():
        raise JobError(f"{option} {model}: no such file or folder{where}. Under `ray job submit`, "
                       f"--working-dir uploads only files that .gitignore does not ignore: give the "
                       f"model's absolute path on the cluster's nodes, or a URI (s3://...)")
    if not os.access(path, os.R_OK):
        raise JobError(f"{option} {model}: permission denied{where}")
    try:
        check_checkpoint(path)
        return str(path), checkpoint_hash(path)
    except (CheckpointError, OSError) as exc:
        raise JobError(f"{option} {model}: {exc}") from None
