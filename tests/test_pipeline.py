"""generate() against diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on the
same tiny random-weight checkpoint, seeds and scheduler; batch invariance; dtypes; bad input."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from test_samplers import diffusers_scheduler

import sdbatch
from sdbatch.model.pipeline import load_init_image
from sdbatch.model.samplers import SAMPLERS

SIZE, STEPS, STRENGTH = 64, 5, 0.6
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk, oil painting"]
NEGATIVES = ["blurry, low quality", ""]
SEEDS = [7, 1234]


@pytest.fixture(scope="module")
def model(tiny_diffusers_dir):
    return sdbatch.load_model(tiny_diffusers_dir)


@pytest.fixture(scope="module")
def pipes(tiny_diffusers_dir):
    txt2img = StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img, txt2img.scheduler.config  # the folder's own (SD v1.5) scheduler config


def init_images() -> list:
    """An RGBA PIL image of another size and aspect ratio, and a uint8 array of the target size."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (88, 72, 4), dtype=np.uint8), "RGBA")
    smooth = np.linspace(0, 255, SIZE, dtype=np.float32)
    array = np.stack([np.add.outer(smooth, smooth) / 2, np.add.outer(smooth, -smooth) / 2 + 128, 255 - np.tile(smooth, (SIZE, 1))], -1)
    return [rgba, array.astype(np.uint8)]


def on_white(image: Image.Image) -> Image.Image:
    """RGB as we read images (transparency composited onto white); diffusers would drop the alpha."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def run_diffusers(pipes, sampler, negatives, cfg_scale, img2img, prompts=PROMPTS, seeds=SEEDS) -> np.ndarray:
    txt2img_pipe, img2img_pipe, scheduler_config = pipes
    pipe = img2img_pipe if img2img else txt2img_pipe
    pipe.scheduler = diffusers_scheduler(sampler, scheduler_config)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=cfg_scale, negative_prompt=negatives, output_type="np")
    if img2img:  # diffusers keeps the init image's own size: hand it the image resized as ours is
        processor = pipe.image_processor
        pil = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in init_images()]
        kwargs.update(image=[processor.resize(on_white(im), SIZE, SIZE) for im in pil], strength=STRENGTH)
    else:
        kwargs.update(height=SIZE, width=SIZE)
    with torch.no_grad():
        images = pipe(prompts, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kwargs).images
    return (images * 255).round().astype(np.uint8)


def run_ours(model, sampler, negatives, cfg_scale, img2img, prompts=PROMPTS, seeds=SEEDS) -> np.ndarray:
    extra = dict(init_images=init_images(), strength=STRENGTH) if img2img else {}
    return sdbatch.generate(
        model, prompts, negatives, seeds=seeds, steps=STEPS, cfg_scale=cfg_scale, sampler=sampler,
        width=SIZE, height=SIZE, progress=False, **extra,
    )


def assert_images_close(actual: np.ndarray, expected: np.ndarray, tol: int) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert expected.std() > 10  # real images, not a constant
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= tol, f"max |diff| {diff.max()}/255, {np.mean(diff > tol):.2%} of values over {tol}"


# guidance on with a per-row negative prompt (row 1's "" is the default), and guidance off (cfg 1)
GUIDANCE = {"cfg7.5-negative": (NEGATIVES, 7.5), "cfg1": (None, 1.0)}


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_matches_diffusers(model, pipes, sampler, guidance, img2img):
    negatives, cfg_scale = GUIDANCE[guidance]
    expected = run_diffusers(pipes, sampler, negatives, cfg_scale, img2img)
    assert_images_close(run_ours(model, sampler, negatives, cfg_scale, img2img), expected, tol=2)


def test_default_negative_prompt_is_the_empty_string(model, pipes):
    expected = run_diffusers(pipes, "dpmpp_2m_karras", None, 7.5, False)
    ours = run_ours(model, "dpmpp_2m_karras", None, 7.5, False)
    assert_images_close(ours, expected, tol=2)
    with_negatives = run_ours(model, "dpmpp_2m_karras", NEGATIVES, 7.5, False)
    np.testing.assert_array_equal(with_negatives[1], ours[1])  # "" is the default
    assert np.abs(with_negatives[0].astype(int) - ours[0]).mean() > 1  # a real negative prompt matters


MIXED = {  # four rows with different prompts, negatives and seeds; row 2 is the one checked alone
    "prompts": ["a castle on a hill", "", "a bowl of ramen, studio light", "an astronaut riding a horse"],
    "negatives": ["", "text, watermark", "cartoon", "blurry"],
    "seeds": [5, 99, 2**40 + 3, 17],
}


@pytest.mark.parametrize("sampler,img2img", [("euler_a", False), ("ddpm", True)])
def test_row_is_the_same_alone_and_in_a_batch(model, sampler, img2img):
    images = [*init_images(), *init_images()] if img2img else None
    common = dict(steps=STEPS, cfg_scale=5.0, sampler=sampler, width=SIZE, height=SIZE, progress=False, strength=0.7)
    batch = sdbatch.generate(
        model, MIXED["prompts"], MIXED["negatives"], seeds=MIXED["seeds"], init_images=images, **common
    )
    alone = sdbatch.generate(
        model, MIXED["prompts"][2:3], MIXED["negatives"][2:3], seeds=MIXED["seeds"][2:3],
        init_images=images[2:3] if img2img else None, **common,
    )
    assert_images_close(alone[0], batch[2], tol=1)
    assert np.abs(batch[2].astype(int) - batch[3]).mean() > 1  # rows really differ


def test_seed_changes_image_and_repeats(model):
    run = lambda seeds: run_ours(model, "euler", None, 7.5, False, prompts=[PROMPTS[0]] * 2, seeds=seeds)
    first, again = run([1, 2]), run([1, 2])
    np.testing.assert_array_equal(first, again)
    assert np.abs(first[0].astype(int) - first[1]).mean() > 1


@pytest.mark.parametrize(
    "width,height",
    [
        (128, 64),
        (48, 80),  # latents 6x10: odd sizes at the lower levels of the U-Net
    ],
)
def test_any_aspect_ratio(model, width, height):
    images = sdbatch.generate(model, PROMPTS[:1], seeds=[0], steps=2, width=width, height=height, progress=False)
    assert images.shape == (1, height, width, 3) and images.dtype == np.uint8


def test_bfloat16_close_to_float32(model, tiny_diffusers_dir):
    bf16 = sdbatch.load_model(tiny_diffusers_dir, dtype=torch.bfloat16)
    ours_bf16 = run_ours(bf16, "dpmpp_2m_karras", NEGATIVES, 7.5, False)
    ours_fp32 = run_ours(model, "dpmpp_2m_karras", NEGATIVES, 7.5, False)
    assert ours_bf16.dtype == np.uint8 and ours_bf16.shape == ours_fp32.shape
    assert np.abs(ours_bf16.astype(int) - ours_fp32).mean() < 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 runs on CUDA only")
def test_float16_cuda_close_to_float32(model, tiny_diffusers_dir):
    fp16 = sdbatch.load_model(tiny_diffusers_dir, device="cuda", dtype="auto")
    assert fp16.dtype == torch.float16
    ours_fp16 = run_ours(fp16, "dpmpp_2m_karras", NEGATIVES, 7.5, True)
    ours_fp32 = run_ours(model, "dpmpp_2m_karras", NEGATIVES, 7.5, True)
    assert np.abs(ours_fp16.astype(int) - ours_fp32).mean() < 8


def test_offload_runs_each_network_on_the_device_and_leaves_the_model_in_place(model):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offloaded = sdbatch.generate(model, PROMPTS, seeds=SEEDS, steps=3, width=SIZE, height=SIZE, progress=False,
                                 init_images=init_images(), offload=device)
    assert model.device.type == "cpu" and model.vae.decoder.conv_out.weight.device.type == "cpu"
    expected = sdbatch.generate(model, PROMPTS, seeds=SEEDS, steps=3, width=SIZE, height=SIZE, progress=False,
                                init_images=init_images())
    assert_images_close(offloaded, expected, tol=2)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (30, 50), 200),
        Image.new("P", (64, 64)),
        Image.new("RGBA", (64, 64), (10, 20, 30, 0)),
        np.full((20, 40), 7, np.uint8),
        np.full((64, 64, 1), 7, np.uint8),
        np.full((33, 17, 4), 7, np.uint8),
    ],
    ids=["L", "P", "RGBA", "gray-array", "HW1-array", "RGBA-array"],
)
def test_init_image_any_mode_and_size(image):
    pixels = load_init_image(image, 64, 32)
    assert pixels.shape == (3, 32, 64) and pixels.dtype == torch.float32
    assert -1 <= pixels.min() and pixels.max() <= 1


GOOD = dict(prompts=["a cat"], seeds=[1], steps=4, width=64, height=64, progress=False)
BAD_INPUTS = {
    "width": (dict(width=60), ValueError, "width must be a positive multiple of 8"),
    "height": (dict(height=0), ValueError, "height must be a positive multiple of 8"),
    "steps": (dict(steps=0), ValueError, "steps"),
    "cfg": (dict(cfg_scale=float("nan")), ValueError, "cfg_scale"),
    "sampler": (dict(sampler="plms"), ValueError, "valid samplers: ddpm, ddim"),
    "seed count": (dict(seeds=[1, 2]), ValueError, "seeds has 2 entries but there are 1 prompts"),
    "seed type": (dict(seeds=["1"]), TypeError, r"seeds\[0\]"),
    "seed range": (dict(seeds=[-1]), ValueError, r"seeds\[0\]"),
    "prompt str": (dict(prompts="a cat"), TypeError, "prompts must be a list"),
    "prompt type": (dict(prompts=[None]), TypeError, r"prompts\[0\]"),
    "negatives": (dict(negative_prompts=["a", "b"]), ValueError, "negative_prompts has 2 entries"),
    "strength 0": (dict(init_images=[np.zeros((8, 8, 3), np.uint8)], strength=0.0), ValueError, "strength"),
    "strength >1": (dict(init_images=[np.zeros((8, 8, 3), np.uint8)], strength=1.5), ValueError, "strength"),
    "no step left": (dict(init_images=[np.zeros((8, 8, 3), np.uint8)], strength=0.2), ValueError, "no step"),
    "image count": (dict(init_images=[]), ValueError, "init_images has 0 entries"),
    "image dtype": (dict(init_images=[np.zeros((8, 8, 3), np.float32)]), ValueError, r"init_images\[0\].*uint8"),
    "image type": (dict(init_images=["cat.png"]), TypeError, r"init_images\[0\]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_errors(model, case):
    change, error, message = BAD_INPUTS[case]
    kwargs = {**GOOD, **change}
    with pytest.raises(error, match=message):
        sdbatch.generate(model, kwargs.pop("prompts"), **kwargs)


def test_empty_batch(model):
    assert sdbatch.generate(model, [], seeds=[], width=64, height=32, progress=False).shape == (0, 32, 64, 3)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """SD1.5's size, random weights saved as a diffusers folder and loaded by both (about 9 GiB)."""
    from conftest import diffusers_components, save_diffusers_folder

    folder = save_diffusers_folder(diffusers_components("full"), tmp_path_factory.mktemp("sd15") / "sd15")
    txt2img = StableDiffusionPipeline.from_pretrained(folder)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return sdbatch.load_model(folder), (txt2img, img2img, txt2img.scheduler.config)


@pytest.mark.slow
@pytest.mark.parametrize("sampler,img2img", [("dpmpp_2m_karras", False), ("euler_a", True)])
def test_full_size_matches_diffusers(full_size, sampler, img2img):
    model, pipes = full_size
    expected = run_diffusers(pipes, sampler, NEGATIVES, 7.5, img2img)
    assert_images_close(run_ours(model, sampler, NEGATIVES, 7.5, img2img), expected, tol=2)
