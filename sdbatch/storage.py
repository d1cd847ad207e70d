"""Small fsspec helpers: any URI (local path, s3://, ...) to a filesystem, retries for
transient errors, atomic writes, and Parquet read/write that never uses pyarrow threads on
in-memory buffers (pyarrow 26 can abort the interpreter at exit when it does)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

import fsspec

from sdbatch.errors import JobError

T = TypeVar("T")

ATTEMPTS = 6
BASE_DELAY_S = 0.25

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}
# Exception class names from botocore/aiohttp/urllib3 that mean "try again" (matched by name
# so this module needs none of them installed).
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
                    "ProtocolError", "IncompleteRead", "FSTimeoutError", "ServerTimeoutError"}
_TRANSIENT_WORDS = ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError",
                    "Throttl", "Connection reset", "timed out", "temporarily")


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: dropped connections, timeouts, throttling, 5xx."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)):
        return False
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(e, OSError) and any(w in str(e) for w in _TRANSIENT_WORDS):
            return True
    return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def retry(fn: Callable[..., T], *args: Any, attempts: int = ATTEMPTS, **kwargs: Any) -> T:
    """Calls fn(*args, **kwargs), retrying transient storage errors with jittered backoff."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(BASE_DELAY_S * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    if _is_local(fs):
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would pass back in: plain path for local files, proto://path otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return retry(fs.cat_file, path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes a whole file so that readers see either nothing or all of it."""
    retry(_write_atomic, fs, path, data)


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores commit a PUT atomically
        fs.pipe_file(path, data)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return retry(fs.exists, path)


def list_files(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> list[str]:
    """Sorted files ending in suffix directly under folder; hidden and temp files skipped."""
    fs.invalidate_cache(folder)
    try:
        names = retry(fs.ls, folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(suffix)
                  and not posixpath.basename(n).startswith((".", "_")))


def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if retry(fs.exists, path):
        retry(fs.rm, path, recursive=True)


@contextlib.contextmanager
def _parquet_errors(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    """Unreadable Parquet files (empty, truncated, not Parquet, no permission) -> JobError naming
    the file (exit 2), instead of pyarrow's traceback."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, ValueError) as exc:
        if is_transient(exc):
            raise
        if isinstance(exc, PermissionError):
            reason = "permission denied"
        elif isinstance(exc, FileNotFoundError):
            reason = "no such file"
        else:
            reason = f"not a readable Parquet file (empty, truncated or another format): {exc}"
        raise JobError(f"{to_uri(fs, path)}: {reason}") from None


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None):
    """A whole Parquet file, read from memory without threads (pyarrow's thread pools have aborted
    this process at exit). Raises JobError naming an unreadable file."""
    import pyarrow.parquet as pq

    with _parquet_errors(fs, path):
        return pq.read_table(io.BytesIO(read_bytes(fs, path)), columns=columns, use_threads=False)


def read_parquet_columns(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]):
    """Some columns of a Parquet file, fetching only their bytes (ranged reads), without threads.
    Columns the file lacks are left out. Raises JobError naming an unreadable file."""
    import pyarrow.parquet as pq

    def read():
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f, pre_buffer=False).read(columns=columns, use_threads=False)

    with _parquet_errors(fs, path):
        return retry(read)


def read_parquet_metadata(fs: fsspec.AbstractFileSystem, path: str):
    """A Parquet file's footer (pyarrow FileMetaData: schema, row groups, row counts). Raises
    JobError naming an unreadable file."""
    import pyarrow.parquet as pq

    def read():
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    with _parquet_errors(fs, path):
        return retry(read)


def read_parquet_schema(fs: fsspec.AbstractFileSystem, path: str):
    """A Parquet file's Arrow schema (from its footer). Raises JobError naming an unreadable file."""
    return read_parquet_metadata(fs, path).schema.to_arrow_schema()


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(fs, path, buf.getvalue())
