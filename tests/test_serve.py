"""The A1111-compatible service on real Ray Serve, driven by the `webuiapi` client from PyPI as its
README shows, and by plain HTTP for what a client library would not send: images equal
`sdbatch.generate`'s for the same settings and seeds, concurrent load, bad requests, and the
safeguards (blocked prompts, a flagged image, the watermark and XMP on the others)."""

from __future__ import annotations

import base64
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

import sdbatch
from sdbatch.a1111 import a1111_parameters
from sdbatch.provenance import TRAINED_ALGORITHMIC_MEDIA, add_watermark, payload_agreement, read_watermark

from serve_fixtures import FLAGGED, flagged_images, served  # noqa: F401  (fixture)

SIZE = 64


def expected(served, prompts, seeds, sampler, steps, cfg_scale=7.0, negative="", init=None, strength=0.75):
    return sdbatch.generate(served.model, prompts, [negative] * len(prompts), seeds=seeds, steps=steps,
                            cfg_scale=cfg_scale, sampler=sampler, width=SIZE, height=SIZE, progress=False,
                            init_images=None if init is None else [init] * len(prompts), strength=strength)


@pytest.fixture(scope="module")
def api(served):  # noqa: F811
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=served.port, sampler="Euler a", steps=3)


def test_webuiapi_txt2img_equals_generate(served, api):  # noqa: F811
    result = api.txt2img(prompt="a red cube", negative_prompt="blurry", seed=1003, cfg_scale=7, width=SIZE,
                         height=SIZE, batch_size=2, n_iter=2)
    assert result.info["all_seeds"] == [1003, 1004, 1005, 1006]  # seeds count up over the batches
    assert result.info["sampler_name"] == "Euler a" and result.info["sd_model_hash"] == served.model.hash[:10]
    want = expected(served, ["a red cube"] * 4, [1003, 1004, 1005, 1006], "euler_a", 3, negative="blurry")
    for i, image in enumerate(result.images):
        assert np.array_equal(np.asarray(image.convert("RGB")), want[i]), f"image {i}"
        row = dict(prompt="a red cube", negative_prompt="blurry", seed=1003 + i, steps=3, sampler="euler_a",
                   cfg_scale=7.0, width=SIZE, height=SIZE)
        assert image.info["parameters"] == a1111_parameters(row, served.model.hash) == result.info["infotexts"][i]
    assert result.parameters["prompt"] == "a red cube" and result.parameters["batch_size"] == 2
    assert not np.array_equal(want[0], want[1])
    # safeguards on: nothing flagged; 64x64 is too small for the watermark; XMP on every PNG
    assert result.info["nsfw"] == result.info["watermark"] == result.info["c2pa"] == [False] * 4
    assert all(TRAINED_ALGORITHMIC_MEDIA.encode() in image.info["xmp"] for image in result.images)


@pytest.mark.parametrize("sampler_name, scheduler, ours", [
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M", "automatic", "dpmpp_2m_karras"),
    ("DPM++ 2M", "Uniform", "dpmpp_2m"), ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("Euler", None, "euler"),
    ("DDIM", "Automatic", "ddim"),
])
def test_webuiapi_samplers(served, api, sampler_name, scheduler, ours):  # noqa: F811
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    if ours == "ddim":  # webuiapi sends eta=1, which A1111 would honour with DDIM (ours is eta 0)
        kwargs["eta"] = 0
    result = api.txt2img(prompt="a blue sphere", seed=7, steps=4, width=SIZE, height=SIZE,
                         sampler_name=sampler_name, **kwargs)
    assert np.array_equal(np.asarray(result.image.convert("RGB")),
                          expected(served, ["a blue sphere"], [7], ours, 4)[0])


def test_webuiapi_img2img_equals_generate(served, api):  # noqa: F811
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    result = api.img2img(images=[init], prompt="a green cone", seed=42, denoising_strength=0.5, steps=4,
                         width=SIZE, height=SIZE, sampler_name="Euler", batch_size=2)
    assert result.info["all_seeds"] == [42, 43] and result.info["denoising_strength"] == 0.5
    want = expected(served, ["a green cone"] * 2, [42, 43], "euler", 4, init=init, strength=0.5)
    for i, image in enumerate(result.images):
        assert np.array_equal(np.asarray(image.convert("RGB")), want[i])
    assert "Denoising strength: 0.5" in result.images[0].info["parameters"]


def test_webuiapi_listings(served, api):  # noqa: F811
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(api.util_get_sampler_names())
    assert {"automatic", "karras", "uniform"} <= set(api.util_get_scheduler_names())
    (model,) = api.get_sd_models()
    assert model["sha256"] == served.model.hash and model["hash"] == served.model.hash[:10]
    assert api.util_get_current_model() == model["title"] == f"tiny.safetensors [{served.model.hash[:10]}]"
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)


def test_random_seed(served, api):  # noqa: F811
    result = api.txt2img(prompt="x", seed=-1, width=SIZE, height=SIZE, batch_size=2)
    seed = result.info["seed"]
    assert seed >= 0 and result.info["all_seeds"] == [seed, seed + 1]
    assert np.array_equal(np.asarray(result.images[1].convert("RGB")),
                          expected(served, ["x"], [seed + 1], "euler_a", 3)[0])


def test_concurrent_requests_all_answered_correctly(served):  # noqa: F811
    """36 requests in flight from 6 client threads, two shapes and three samplers mixed: each image
    equals `generate`'s for its seed alone, however Serve batched it."""
    rng = random.Random(0)
    jobs = [dict(prompt=f"prompt {i}", seed=1000 + 10 * i, steps=rng.choice([2, 3]), width=SIZE, height=SIZE,
                 sampler_name=rng.choice(["Euler a", "DPM++ 2M", "Euler"]), batch_size=rng.choice([1, 2]),
                 cfg_scale=7) for i in range(36)]
    session = requests.Session()

    def post(job):
        r = session.post(f"{served.url}/sdapi/v1/txt2img", json=job, timeout=600)
        return r.status_code, r.json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, jobs))
    ours = {"Euler a": "euler_a", "DPM++ 2M": "dpmpp_2m_karras", "Euler": "euler"}
    for job, (status, body) in zip(jobs, answers):
        assert status == 200, body
        seeds = [job["seed"] + i for i in range(job["batch_size"])]
        assert json.loads(body["info"])["all_seeds"] == seeds
        want = expected(served, [job["prompt"]] * len(seeds), seeds, ours[job["sampler_name"]], job["steps"])
        for i, data in enumerate(body["images"]):
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            assert np.array_equal(got, want[i]), (job, i)


def _png_b64(data: bytes = b"") -> str:
    return base64.b64encode(data).decode()


BAD = [
    ("txt2img", {"sampler_name": "Heun"}, "sampler_name", 422),
    ("txt2img", {"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler", 422),
    ("txt2img", {"scheduler": "Exponential", "sampler_name": "DPM++ 2M"}, "scheduler", 422),
    ("txt2img", {"width": 65}, "width", 422),
    ("txt2img", {"height": 0}, "height", 422),
    ("txt2img", {"width": 4096, "height": 4096}, "width", 413),
    ("txt2img", {"batch_size": 60, "n_iter": 60}, "n_iter", 413),
    ("txt2img", {"steps": -3}, "steps", 422),
    ("txt2img", {"steps": "many"}, "steps", 422),
    ("txt2img", {"cfg_scale": "NaN"}, "cfg_scale", 422),
    ("txt2img", {"seed": -7}, "seed", 422),
    ("txt2img", {"enable_hr": True}, "enable_hr", 422),
    ("txt2img", {"restore_faces": True}, "restore_faces", 422),
    ("txt2img", {"sampler_name": "Euler a", "eta": 0.3}, "eta", 422),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings", 422),
    ("img2img", {}, "init_images", 422),
    ("img2img", {"init_images": ["not base64 at all!"]}, "init_images", 422),
    ("img2img", {"init_images": [_png_b64(b"\x89PNG but not really")]}, "init_images", 422),
    ("img2img", {"init_images": ["data:image/png;base64,AAAA"], "denoising_strength": 1.5}, "init_images", 422),
    ("img2img", {"init_images": [None]}, "init_images", 422),
    ("img2img", {"init_images": "x", "mask": "y"}, "init_images", 422),
]


@pytest.mark.parametrize("endpoint, fields, field, status", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_names_the_field(served, endpoint, fields, field, status):  # noqa: F811
    body = {"prompt": "p", "steps": 2, "width": SIZE, "height": SIZE, **fields}
    r = requests.post(f"{served.url}/sdapi/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert any(field in d["loc"] for d in detail), detail


def test_bad_strength_and_malformed_json(served):  # noqa: F811
    init = Image.new("RGB", (SIZE, SIZE), (10, 20, 30))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    body = dict(prompt="p", steps=2, width=SIZE, height=SIZE, init_images=[_png_b64(buf.getvalue())])
    r = requests.post(f"{served.url}/sdapi/v1/img2img", json=dict(body, denoising_strength=1.5), timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "denoising_strength"]
    r = requests.post(f"{served.url}/sdapi/v1/txt2img", data=b"{not json", timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"
    # ... and it still serves
    r = requests.post(f"{served.url}/sdapi/v1/img2img", json=dict(body, denoising_strength=0.5), timeout=120)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_defaults_of_unsupported_fields_are_ignored(served):  # noqa: F811
    body = dict(prompt="p", steps=2, width=SIZE, height=SIZE, sampler_name="Euler a", eta=1.0, s_noise=1,
                restore_faces=False, enable_hr=False, hr_scale=2, denoising_strength=0.7, styles=[],
                subseed=123, subseed_strength=0, override_settings={}, alwayson_scripts={}, send_images=True,
                some_extension_field={"x": 1})
    r = requests.post(f"{served.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


def test_cli_and_builder_reject_bad_arguments(capsys):
    from sdbatch.__main__ import main
    from sdbatch.serve.app import build

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "m.safetensors", "--replicas", "0"])
    assert exc.value.code == 2 and "--replicas" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model argument is required"):
        build({"replicas": "auto"})
    with pytest.raises(ValueError, match="model nowhere.safetensors does not exist"):
        build({"model": "nowhere.safetensors"})
    with pytest.raises(ValueError, match="replicas='many'"):
        build({"model": __file__, "replicas": "many"})
    with pytest.raises(ValueError, match="nowhere.txt: cannot read the blocklist"):
        build({"model": __file__, "blocklist": "nowhere.txt"})
    with pytest.raises(ValueError, match="no_watermark='maybe'"):
        build({"model": __file__, "no_watermark": "maybe"})
    with pytest.raises(ValueError, match="--c2pa-cert and --c2pa-key go together"):
        build({"model": __file__, "c2pa_cert": __file__})


@pytest.mark.parametrize("fields, field, rule, line", [
    ({"prompt": "a Red  Car on a bridge"}, "prompt", "'red car'", 2),
    ({"negative_prompt": "a forbidden   thing"}, "negative_prompt", "'re:forbidden\\s+thing'", 3),
])
def test_blocked_prompt_is_refused_naming_the_rule(served, fields, field, rule, line):  # noqa: F811
    """422 naming the rule, nothing generated; a request sent with it is answered as usual."""
    ok = dict(prompt="a quiet street", seed=5, steps=2, width=SIZE, height=SIZE, sampler_name="Euler")
    blocked = dict(ok, **fields)
    with ThreadPoolExecutor(2) as pool:
        refused, answered = pool.map(lambda body: requests.post(f"{served.url}/sdapi/v1/txt2img", json=body,
                                                                timeout=300), [blocked, ok])
    assert refused.status_code == 422, refused.text
    (detail,) = refused.json()["detail"]
    assert detail["loc"] == ["body", field], detail
    assert f"matches blocklist rule {rule} ({served.blocklist}, line {line}): nothing generated" in detail["msg"]
    assert answered.status_code == 200 and len(answered.json()["images"]) == 1


def test_flagged_image_left_out_and_the_kept_one_marked(served, api):  # noqa: F811
    """FLAGGED's seed and the next in one request: the flagged image is not returned (info.nsfw
    says which), the other carries the watermark (read back), XMP and its parameters."""
    f = FLAGGED
    result = api.txt2img(prompt=f["prompt"], seed=f["seed"], steps=f["steps"], sampler_name="Euler",
                         width=f["size"], height=f["size"], batch_size=2, cfg_scale=7)
    info = result.info
    assert info["all_seeds"] == [f["seed"], f["seed"] + 1]
    assert info["nsfw"] == [True, False] and info["watermark"] == [False, True] and info["c2pa"] == [False, False]
    (image,) = result.images
    assert image.info["parameters"] == info["infotexts"][1] and f"Seed: {f['seed'] + 1}," in info["infotexts"][1]
    assert TRAINED_ALGORITHMIC_MEDIA.encode() in image.info["xmp"]
    flagged, kept = flagged_images(served.model)
    pixels = np.asarray(image.convert("RGB"))
    assert payload_agreement(read_watermark(pixels)) >= 0.9
    assert payload_agreement(read_watermark(kept)) < 0.75  # unmarked: about half the bits
    assert np.array_equal(pixels, add_watermark(kept))  # seed + 1's image, marked
    assert not np.array_equal(pixels, add_watermark(flagged))
    # alone, the flagged image leaves an empty answer (and a plain HTTP client sees the same)
    r = requests.post(f"{served.url}/sdapi/v1/txt2img", timeout=300, json=dict(
        prompt=f["prompt"], seed=f["seed"], steps=f["steps"], sampler_name="Euler", width=f["size"],
        height=f["size"]))
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["nsfw"] == [True]
