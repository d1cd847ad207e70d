"""Issue 13, model and command-line side: images read as a viewer shows them, checkpoints missing a
key or of another model family, EMA or raw weights, guidance below 1, non-finite outputs, and
commands that name the extra to install. Every image here is a real file written by Pillow."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFile

import sdbatch
from sdbatch.__main__ import main
from sdbatch.images import ImageReadError, read_image
from sdbatch.model.pipeline import NonFiniteError, load_init_image
from sdbatch.model.unet import UNetConfig
from sdbatch.model.weights import TINY_CONFIG, CheckpointError, ModelConfig, read_weights, save_checkpoint, save_random_checkpoint

GEN = dict(steps=2, width=32, height=32, progress=False)


def quadrants(h: int = 48, w: int = 64) -> np.ndarray:
    """An image whose four flat quadrants tell every rotation and flip apart (survives JPEG)."""
    image = np.zeros((h, w, 3), np.uint8)
    for (i, j), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [(220, 30, 30), (30, 200, 40), (40, 40, 210), (240, 230, 60)]):
        image[i * h // 2 : (i + 1) * h // 2, j * w // 2 : (j + 1) * w // 2] = colour
    return image


def jpeg_with_orientation(path, pixels: np.ndarray, orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", seed=3)


# ----------------------------------------------------------------------------- item 1: one image reader


def test_exif_orientation_is_applied(tmp_path):
    upright = quadrants()
    # orientation 6: the camera stored the picture turned 90 degrees counter-clockwise; show it turned clockwise
    stored = np.rot90(upright, 1).copy()
    path = jpeg_with_orientation(tmp_path / "phone.jpg", stored, 6)
    image = np.asarray(read_image(path)).astype(int)
    assert image.shape == upright.shape
    assert np.abs(image - upright).mean() < 4
    # the pipeline's own conversion of an opened PIL image does the same (init_images of generate())
    with Image.open(path) as opened:
        tensor = load_init_image(opened, 64, 48)
    assert (tensor.permute(1, 2, 0).add(1).mul(127.5) - torch.from_numpy(upright)).abs().mean() < 4



def test_served_and_metrics_images_use_the_same_reader(tmp_path):
    """img2img's base64 init images (serve) and FID's inputs (inception) come out upright too."""
    import base64

    from sdbatch.inception import read_image as read_for_metrics
    from sdbatch.serve.a1111_api import decode_image

    upright = quadrants()
    path = jpeg_with_orientation(tmp_path / "phone.jpg", np.rot90(upright, 1).copy(), 6)
    served = np.asarray(decode_image(base64.b64encode(path.read_bytes()).decode(), "init_images")).astype(int)
    assert np.abs(served - upright).mean() < 4
    assert np.array_equal(read_for_metrics(str(path)), np.asarray(read_image(path)))

def test_bit_depths_palettes_and_modes(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert np.array_equal(np.asarray(read_image(tmp_path / "grey16.png"))[..., 0], np.round(ramp / 257).astype(np.uint8))

    floats = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    Image.fromarray(floats, "F").save(tmp_path / "float.tif")
    assert np.abs(np.asarray(read_image(tmp_path / "float.tif"))[..., 1].astype(int) - floats * 255).max() <= 1

    # a palette PNG whose entry 0 is transparent (tRNS): those pixels show white
    pixels = quadrants()
    palette = Image.fromarray(pixels).quantize(4)
    palette.save(tmp_path / "palette.png", transparency=0)
    index = np.asarray(palette)
    rgb = np.asarray(read_image(tmp_path / "palette.png"))
    assert (rgb[index == 0] == 255).all() and (index == 0).any()
    opaque = np.asarray(palette.convert("RGB"))[index != 0]
    assert np.array_equal(rgb[index != 0], opaque)

    # RGBA and LA: composited onto white, alpha-weighted
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(np.dstack([pixels, alpha])).save(tmp_path / "rgba.png")
    expected = (pixels * (alpha[..., None] / 255.0) + 255 * (1 - alpha[..., None] / 255.0))
    assert np.abs(np.asarray(read_image(tmp_path / "rgba.png")).astype(float) - expected).max() <= 1
    Image.fromarray(np.dstack([pixels[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    assert np.abs(np.asarray(read_image(tmp_path / "la.png"))[..., 2].astype(float) - expected[..., 0]).max() <= 1

    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(np.asarray(read_image(tmp_path / "cmyk.jpg")).astype(int) - pixels).mean() < 4


def test_multi_frame_files_give_the_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (20, 200, 90)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 3
    assert (np.asarray(read_image(tmp_path / "anim.gif")) == 20).all()


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_truncated_and_undecodable_files_are_errors_naming_the_file(tmp_path, kind, monkeypatch):
    Image.fromarray(quadrants()).save(tmp_path / f"whole.{kind}")
    data = (tmp_path / f"whole.{kind}").read_bytes()
    (tmp_path / f"cut.{kind}").write_bytes(data[: len(data) * 2 // 3])
    # even where some other code asked Pillow to accept truncated files
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match=rf"cut\.{kind}: .*truncated"):
        read_image(tmp_path / f"cut.{kind}")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as it was
    (tmp_path / f"text.{kind}").write_text("not an image")
    with pytest.raises(ImageReadError, match=rf"text\.{kind}: cannot read the image"):
        read_image(tmp_path / f"text.{kind}")
    with pytest.raises(ImageReadError, match=r"s3://b/x\.png: "):
        read_image(data[:100], name="s3://b/x.png")


def test_cli_init_image_is_read_upright_and_truncated_is_exit_2(tiny, tmp_path, capsys):
    upright = quadrants(64, 64)
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    jpeg_with_orientation(tmp_path / "phone.jpg", np.rot90(upright, 1).copy(), 6)
    args = ["--model", str(tiny), "--seed", "5", "--steps", "2", "--width", "64", "--height", "64",
            "--dtype", "float32", "--device", "cpu", "--strength", "0.5"]
    for name in ("upright", "phone"):
        assert main(["generate", "x", "-o", str(tmp_path / f"{name}.png"), "--init-image",
                     str(tmp_path / f"{name}.jpg"), *args]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("upright", "phone"))
    assert np.abs(a - b).mean() < 3  # JPEG noise only; sideways differs by far more

    data = (tmp_path / "upright.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["generate", "x", "-o", str(tmp_path / "cut.png"), "--init-image", str(tmp_path / "cut.jpg"), *args]) == 2
    assert "--init-image" in capsys.readouterr().err and not (tmp_path / "cut.png").exists()


# ----------------------------------------------------------------------------- item 8: the missing key is named


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.4.1.proj_in.weight",  # the reported one: it made the attention level vanish
    "model.diffusion_model.input_blocks.3.0.op.weight",        # a downsample: it changed the inferred level count
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
    "model.diffusion_model.output_blocks.11.1.proj_out.bias",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.decoder.up.3.block.2.norm2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
])
def test_a_missing_key_is_named(tiny, tmp_path, key):
    sd = read_weights(tiny)
    del sd[key]
    save_checkpoint(sd, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError) as error:
        sdbatch.load_model(tmp_path / "missing.safetensors")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'missing.safetensors'}: ") and key in message
    assert "unexpected" not in message and message.count("model.") <= 2  # that key, not dozens of others


# ----------------------------------------------------------------------------- item 9: other model families


def _with_unet(tmp_path, name: str, **unet) -> str:
    config = ModelConfig(unet=UNetConfig(**{**TINY_CONFIG.unet.__dict__, **unet}), vae=TINY_CONFIG.vae,
                         text_encoder=TINY_CONFIG.text_encoder)
    return str(save_random_checkpoint(tmp_path / name, config=config))


@pytest.mark.parametrize("unet, kind", [
    (dict(in_channels=9), "an inpainting model"),
    (dict(in_channels=5), "a depth-to-image model"),
    (dict(context_dim=1024), "an SD 2.x model"),
])
def test_other_unets_are_refused_at_load_time(tmp_path, unet, kind):
    path = _with_unet(tmp_path, "variant.safetensors", **unet)
    with pytest.raises(CheckpointError, match=rf"variant\.safetensors: refused: this is {kind}.*SD v1\.x text-to-image"):
        sdbatch.load_model(path)


def test_other_layouts_are_refused_by_name(tiny, tmp_path):
    sd = read_weights(tiny)
    sd2 = {k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for k, v in sd.items()}
    save_checkpoint(sd2, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match=r"sd2\.safetensors: refused: this is an SD 2\.x checkpoint"):
        sdbatch.load_model(tmp_path / "sd2.safetensors")
    xl = {k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."): v for k, v in sd.items()}
    save_checkpoint(xl, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: refused: this is an SDXL checkpoint"):
        sdbatch.load_model(tmp_path / "xl.safetensors")
    save_checkpoint(dict(sd, v_pred=torch.zeros(())), tmp_path / "vpred.safetensors")
    with pytest.raises(CheckpointError, match=r"vpred\.safetensors: refused: this is a v-prediction model"):
        sdbatch.load_model(tmp_path / "vpred.safetensors")


def test_diffusers_inpainting_and_v_prediction_folders_are_refused(tiny_diffusers_dir, tmp_path):
    folder = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
    with pytest.raises(CheckpointError, match=r"model: refused: this is a v_prediction model"):
        sdbatch.load_model(folder)
    scheduler.write_text(json.dumps(config))
    unet = folder / "unet" / "config.json"
    unet.write_text(json.dumps(dict(json.loads(unet.read_text()), in_channels=9)))
    with pytest.raises(CheckpointError, match=r"model: refused: this is an inpainting model"):
        sdbatch.load_model(folder)


# ----------------------------------------------------------------------------- item 11: EMA or raw weights


def test_ema_is_the_default_and_no_ema_takes_the_raw_weights(tiny, tmp_path, capsys):
    sd = read_weights(tiny)
    raw = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    full = dict(sd)
    gen = torch.Generator().manual_seed(0)
    for key, value in raw.items():  # the EMA weights differ from the raw ones
        full["model_ema." + key[len("model."):].replace(".", "")] = value + 0.05 * torch.randn(value.shape, generator=gen)
    save_checkpoint(full, tmp_path / "full.safetensors")
    ema_only = {**sd, **{k: full["model_ema." + k[len("model."):].replace(".", "")] for k in raw}}
    save_checkpoint(ema_only, tmp_path / "ema-only.safetensors")

    unet_weight = "input_blocks.1.0.in_layers.2.weight"
    default = sdbatch.load_model(tmp_path / "full.safetensors").unet.state_dict()[unet_weight]
    plain = sdbatch.load_model(tmp_path / "full.safetensors", ema=False).unet.state_dict()[unet_weight]
    assert torch.equal(default, ema_only[f"model.diffusion_model.{unet_weight}"])
    assert torch.equal(plain, raw[f"model.diffusion_model.{unet_weight}"])

    args = ["x", "--seed", "3", "--steps", "2", "--width", "32", "--height", "32", "--dtype", "float32", "--device", "cpu"]
    for name, model, extra in [("ema", "full", []), ("raw", "full", ["--no-ema"]), ("ref-ema", "ema-only", []),
                               ("ref-raw", "ema-only", [])]:
        source = tmp_path / f"{model}.safetensors" if name != "ref-raw" else tiny
        assert main(["generate", *args, "--model", str(source), "-o", str(tmp_path / f"{name}.png"), *extra]) == 0
    png = {n: np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("ema", "raw", "ref-ema", "ref-raw")}
    assert np.array_equal(png["ema"], png["ref-ema"]) and np.array_equal(png["raw"], png["ref-raw"])
    assert not np.array_equal(png["ema"], png["raw"])


# ----------------------------------------------------------------------------- item 12: guidance below 1


def test_guidance_below_one_follows_the_formula(tiny):
    """One deterministic Euler step ends at x - sigma * eps, affine in the guided eps, so the final
    latents are affine in cfg_scale: L(s) = L(0) + s (L(1) - L(0)) for every s, also in (0, 1).
    (diffusers skips guidance for any scale <= 1: there L(0.5) would be L(1).)"""
    model = sdbatch.load_model(tiny)
    kwargs = dict(seeds=[11, 12], steps=1, sampler="euler", width=32, height=32, progress=False, return_latents=True)
    latent = {s: sdbatch.generate(model, ["a cat", "a dog"], ["", "blur"], cfg_scale=s, **kwargs)[1]
              for s in (0.0, 0.3, 0.5, 1.0)}
    step = latent[1.0] - latent[0.0]
    assert np.abs(step).mean() > 1e-3  # guidance changes the result
    for s in (0.3, 0.5):  # (skipping guidance would miss by (1 - s) * step)
        assert np.abs(latent[s] - (latent[0.0] + s * step)).max() < 0.01 * np.abs(step).max()


# ----------------------------------------------------------------------------- item 3: non-finite outputs


def _overflowing(tmp_path, tiny, bias: float):
    """The tiny model stored in float16, its first U-Net conv's bias set to `bias`."""
    sd = {k: v.half() for k, v in read_weights(tiny).items()}
    key = "model.diffusion_model.input_blocks.0.0.bias"
    sd[key] = torch.full(sd[key].shape, bias)  # float32: 1e5 does not fit float16
    path = tmp_path / f"bias{bias:g}.safetensors"
    save_checkpoint(sd, path)
    return path


def test_float16_overflow_is_retried_in_float32(tiny, tmp_path):
    path = _overflowing(tmp_path, tiny, 3e4)  # fits float16, but the activations built on it overflow
    half = sdbatch.load_model(path, dtype=torch.float16)
    full = sdbatch.load_model(path, dtype=torch.float32)  # the very same (float16-stored) weights
    images = sdbatch.generate(half, ["a", "b"], seeds=[1, 2], **GEN)
    assert np.array_equal(images, sdbatch.generate(full, ["a", "b"], seeds=[1, 2], **GEN))
    # the model is float16 again after the retry, its VAE decoder still float32
    assert half.dtype == torch.float16 and half.vae.decoder.conv_out.weight.dtype == torch.float32
    assert half.text_encoder.text_model.final_layer_norm.weight.dtype == torch.float16


def test_still_non_finite_rows_raise_and_the_cli_writes_no_black_image(tiny, tmp_path, capsys):
    path = _overflowing(tmp_path, tiny, 1e5)  # inf in float16: float32 cannot save it either
    half = sdbatch.load_model(path, dtype=torch.float16)
    with pytest.raises(NonFiniteError, match=r"rows \[0, 1\] .*non-finite .*float16 and again in float32") as error:
        sdbatch.generate(half, ["a", "b"], seeds=[1, 2], **GEN)
    assert error.value.rows == [0, 1]
    capsys.readouterr()
    out = tmp_path / "out.png"
    assert main(["generate", "x", "--model", str(path), "-o", str(out), "--dtype", "float16", "--device", "cpu",
                 "--steps", "2", "--width", "32", "--height", "32", "--seed", "4"]) == 1
    assert not out.exists() and "seed 4 came out non-finite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 10: missing extras


def test_a_missing_extra_is_named_with_exit_2(tiny, tmp_path):
    """A command run where an optional dependency cannot be imported (hidden by a meta path finder)
    says which extra to install, and exits 2."""
    script = textwrap.dedent("""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        HIDDEN = set(sys.argv[1].split(","))
        sys.meta_path.insert(0, Hide())
        module = __import__(sys.argv[2], fromlist=["main"])
        sys.exit(module.main(sys.argv[3:]))
    """)
    import pyarrow.parquet as pq

    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), table)
    for name in ("generated", "reference"):
        (tmp_path / name).mkdir()
        Image.fromarray(quadrants()).save(tmp_path / name / "a.png")
    cases = [
        ("torch_fidelity", "sdbatch.jobs.cli", ["metrics", str(tmp_path / "generated"), "--reference",
                                                str(tmp_path / "reference")], "metrics"),
        ("ray,pyarrow", "sdbatch.jobs.cli", ["run", str(table), "--model", str(tiny), "--output", str(tmp_path / "o")],
         "ray"),
    ]
    for hidden, module, argv, extra in cases:
        run = subprocess.run([sys.executable, "-c", script, hidden, module, *argv], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2, run.stderr
        assert f"pip install 'sdbatch[{extra}]'" in run.stderr and "Traceback" not in run.stderr
