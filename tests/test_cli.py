"""`python -m sdbatch` as a user runs it: a subprocess on real checkpoint files."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdbatch
from sdbatch.__main__ import main

ARGS = ["--steps", "3", "--width", "64", "--height", "64", "--device", "cpu", "--dtype", "float32"]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdbatch", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_generate_several_images_with_metadata(tiny_safetensors, tmp_path):
    out = tmp_path / "shots" / "cat.png"
    run = cli("generate", "a cat", "--model", str(tiny_safetensors), "-o", str(out), "--negative", "dog",
              "--seed", "41", "--num-images", "3", "--batch-size", "2", "--sampler", "euler_a", *ARGS)
    assert run.returncode == 0, run.stderr
    paths = [tmp_path / "shots" / f"cat-{i}.png" for i in range(3)]
    assert run.stdout.split() == [str(p) for p in paths]
    assert "100%" in run.stderr  # the progress bar ran to the end
    assert "64x64 images are written without the invisible watermark" in run.stderr  # says why, once

    model = sdbatch.load_model(tiny_safetensors)
    expected = sdbatch.generate(model, ["a cat"] * 3, ["dog"] * 3, seeds=[41, 42, 43], steps=3,
                                sampler="euler_a", width=64, height=64, progress=False)
    for i, path in enumerate(paths):
        with Image.open(path) as png:
            written = np.asarray(png.convert("RGB")).astype(int)
            assert np.abs(written - expected[i]).max() <= 1  # batches of 2 here, of 3 there
            parameters = png.text["parameters"]
        assert parameters.startswith("a cat\nNegative prompt: dog\n")
        assert f"Seed: {41 + i}" in parameters and "Sampler: Euler a" in parameters
        assert f"Model hash: {model.hash[:10]}" in parameters


def test_smoke_model_then_image_to_image(tmp_path):
    ckpt = tmp_path / "smoke.safetensors"
    made = cli("make-smoke-model", str(ckpt), "--seed", "3")
    assert made.returncode == 0, made.stderr
    assert ckpt.is_file() and made.stdout.strip() == str(ckpt)

    Image.new("RGBA", (40, 56), (200, 30, 90, 255)).save(tmp_path / "init.png")
    out = tmp_path / "i2i.png"
    run = cli("generate", "a red square", "--model", str(ckpt), "-o", str(out), "--seed", "7",
              "--init-image", str(tmp_path / "init.png"), "--strength", "0.5", "--sampler", "ddim", *ARGS)
    assert run.returncode == 0, run.stderr
    with Image.open(out) as png:
        assert png.size == (64, 64) and png.mode == "RGB"
        assert "Denoising strength: 0.5" in png.text["parameters"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "60"], "must be a positive multiple of 8"),
        (["--sampler", "plms"], "invalid choice"),
        (["--strength", "0"], "must be in (0, 1]"),
        (["-o", "out.jpg"], "must be a .png file"),
        (["--model", "missing.safetensors"], "missing.safetensors"),
        (["--init-image", "missing.png"], "--init-image missing.png"),
    ],
)
def test_bad_arguments(tiny_safetensors, tmp_path, monkeypatch, capsys, args, message):
    # in-process (no interpreter start-up per case); the last occurrence of an option wins
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["generate", "a cat", "--model", str(tiny_safetensors), "-o", "out.png", *ARGS, *args])
    except SystemExit as exit:  # argparse rejects the value
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
