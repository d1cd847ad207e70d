"""A private local Ray head for the job tests: `ray start --head --block` in its own process
group, with its own temp dir and ports (other Ray clusters may share the host), token
authentication on (Ray 2.60's default) with a token of its own, and the S3 test endpoint
in its environment. Stopped by signalling that process group: never `ray stop`, which
would end every Ray cluster of the user on the host."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port, set_env

BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    address: str       # GCS address, for RAY_ADDRESS / ray.init
    dashboard: str     # http://..., for `ray job submit --address`
    env: dict          # environment for clients (drivers, `ray job submit`)
    temp_dir: str


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # answering (even 401 without a token): up
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"Ray dashboard at {url} did not come up in {timeout:.0f} s")


def _reload_auth_settings() -> None:
    """Make this process's Ray pick up RAY_AUTH_* from the environment again."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), up to
    `grace_s` for it to exit, then SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()


@pytest.fixture(scope="module")
def ray_head(s3_endpoint, tmp_path_factory):
    """Yields a RayHead; the pytest process itself is connected to it as a driver."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="sdbj", dir="/tmp")  # short: unix socket paths
    gcs_port, dash_port = free_port(), free_port()
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        AWS_ENDPOINT_URL=s3_endpoint,
        SDBATCH_CACHE=str(tmp_path_factory.mktemp("model-cache")),
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}",
           f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={300 * 2**20}",
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env, temp_dir)
    try:
        _wait_for_dashboard(head.dashboard, proc, timeout=180)
        with set_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"], RAY_AUTH_TOKEN_PATH=None,
                     RAY_ADDRESS=head.address, AWS_ENDPOINT_URL=s3_endpoint):
            try:
                _reload_auth_settings()
                for attempt in range(3):  # a loaded 2-core machine can time the first connection out
                    try:
                        ray.init(address=head.address, logging_level="WARNING")
                        break
                    except (ConnectionError, RuntimeError):
                        if attempt == 2:
                            raise
                        ray.shutdown()
                yield head
            finally:
                if ray.is_initialized():
                    ray.shutdown()
    finally:
        stop_process_group(proc)
        log.close()
        _reload_auth_settings()
        shutil.rmtree(temp_dir, ignore_errors=True)
