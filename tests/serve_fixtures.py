"""The service under test: a tiny random-weight checkpoint served by the real Ray Serve
application (`sdbatch.serve.app.build`) on a local Ray with one CPU, so one model replica with
one torch thread takes every request and Serve's batching puts concurrent requests together.

Its safeguards are on: the watermark (the default), a blocklist (`BLOCKLIST`), and a random-weight
safety checker that flags exactly one image, `FLAGGED` (prompt, seed; 256x256): one concept's
embedding is that image's own, its threshold just under a cosine similarity of 1, every other
threshold out of reach."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port

BLOCKLIST = "# test rules\nred car\nre:forbidden\\s+thing\n"
FLAGGED = dict(prompt="a harbour at dusk", seed=311, steps=2, sampler="euler", size=256)


@dataclass
class Served:
    url: str          # http://127.0.0.1:PORT
    port: int
    model_path: str
    model: object     # the same checkpoint loaded in the test process, for reference images
    blocklist: Path


def flagged_images(model, count: int = 2):
    """FLAGGED's image (seed) and the next `count - 1` seeds' (uint8, 256x256), as `generate` makes them."""
    import sdbatch

    f = FLAGGED
    return sdbatch.generate(model, [f["prompt"]] * count, seeds=[f["seed"] + i for i in range(count)],
                            steps=f["steps"], cfg_scale=7.0, sampler=f["sampler"], width=f["size"], height=f["size"],
                            progress=False)


def checker_flagging(model, folder: Path) -> Path:
    """A diffusers model folder whose safety checker flags FLAGGED's image only (checked here
    against the next seed's image and a 64x64 one, which must stay far below the threshold)."""
    import torch

    import sdbatch
    from sdbatch.model.safety import load_safety_checker
    from test_safeguards import random_reference, save_checker

    images = [*flagged_images(model), *sdbatch.generate(model, ["a red cube"], seeds=[1], steps=2, width=64,
                                                        height=64, progress=False)]
    ref = random_reference(seed=1)
    save_checker(ref, folder)
    with torch.no_grad():
        pixels = load_safety_checker(str(folder)).preprocess(images)
        embeds = torch.nn.functional.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
        assert float((embeds[1:] @ embeds[0]).max()) < 0.9, "random weights that embed the images alike"
        ref.concept_embeds[0] = embeds[0]
        ref.concept_embeds_weights.fill_(2.0)  # cosine similarities never exceed 1 ...
        ref.concept_embeds_weights[0] = 0.99  # ... but FLAGGED's with itself, 1
        ref.special_care_embeds_weights.fill_(2.0)
    return save_checker(ref, folder)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    import sdbatch
    from sdbatch.model.weights import save_random_checkpoint
    from sdbatch.serve.app import build

    folder = tmp_path_factory.mktemp("serve")
    path = str(save_random_checkpoint(folder / "tiny.safetensors"))
    model = sdbatch.load_model(path, device="cpu", dtype="auto")
    (folder / "rules.txt").write_text(BLOCKLIST)
    checker = checker_flagging(model, folder / "checker")
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": path, "max_batch_size": 4, "max_pixels": 256 * 256,
                         "blocklist": str(folder / "rules.txt"), "safety_checker": str(checker)}),
                  name="sdbatch", route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", port, path, model, folder / "rules.txt")
    finally:
        serve.shutdown()
        ray.shutdown()
