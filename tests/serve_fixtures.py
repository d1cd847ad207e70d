"""The service under test: a tiny random-weight checkpoint served by the real Ray Serve
application (`sdbatch.serve.app.build`) on a local Ray with one CPU, so one model replica with
one torch thread takes every request and Serve's batching puts concurrent requests together."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import free_port


@dataclass
class Served:
    url: str          # http://127.0.0.1:PORT
    port: int
    model_path: str
    model: object     # the same checkpoint loaded in the test process, for reference images


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    import sdbatch
    from sdbatch.model.weights import save_random_checkpoint
    from sdbatch.serve.app import build

    path = str(save_random_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.safetensors"))
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": path, "max_batch_size": 4, "max_pixels": 256 * 256}), name="sdbatch",
                  route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", port, path, sdbatch.load_model(path, device="cpu", dtype="auto"))
    finally:
        serve.shutdown()
        ray.shutdown()
