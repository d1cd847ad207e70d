"""The built-in demo model (`builtin:shapes`, issue 14): the name resolves to the shipped file, which
loads through the normal path; commands without --model use it, say so, and make 64x64 images; it
follows its prompts (adherence, a small sample against a lower bar than the benchmark's targets)."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import sdbatch
from sdbatch import builtin
from sdbatch.data import adherence, shapes
from sdbatch.errors import JobError
from sdbatch.jobs import cli
from sdbatch.jobs.common import check_model
from sdbatch.model.training import CONFIGS
from sdbatch.model.weights import CheckpointError, native_size, read_safetensors, save_checkpoint
from sdbatch.serve.app import build
from sdbatch.sheet import RIGHT, WRONG, contact_sheet

ROOT = Path(__file__).resolve().parents[1]
# Share of ADHERENCE_PROMPTS seen-triple prompts on which the adherence checker reads back every
# attribute. The benchmark's target is 90% on 200 (benchmarks/bench_adherence.py); this bar sits
# below what the shipped model measures on this sample (sdbatch/builtin/shapes.md), so a model
# that stopped following prompts fails. TODO-LEAD: set from the trained model's figure.
ADHERENCE_BAR = 0.75
ADHERENCE_PROMPTS = 16
MAX_FILE_BYTES = 25_000_000  # the limit on the shipped file
NOTICE = "built-in demo model"


@pytest.fixture(scope="module")
def shapes_file() -> Path:
    try:
        return builtin.builtin_path("shapes")
    except builtin.BuiltinModelError as e:
        pytest.skip(f"the built-in model's file is not in this checkout yet: {e}")


def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_builtin_shapes_loads_through_the_normal_path(shapes_file):
    assert shapes_file.stat().st_size <= MAX_FILE_BYTES
    model = sdbatch.load_model("builtin:shapes")
    assert model.hash == hashlib.sha256(shapes_file.read_bytes()).hexdigest()
    assert model.config.unet == CONFIGS["shapes"].unet
    assert model.config.vae == CONFIGS["shapes"].vae
    assert model.config.text_encoder == CONFIGS["shapes"].text_encoder
    assert native_size("builtin:shapes") == shapes.SIDE
    assert check_model("builtin:shapes", "--init") == ("builtin:shapes", model.hash)  # as jobs run/train take it
    by_path = sdbatch.load_model(shapes_file)
    for (name, a), (_, b) in zip(model.unet.state_dict().items(), by_path.unet.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_or_missing_builtin_names_the_model(tmp_path, monkeypatch, capsys):
    assert builtin.names() == ("shapes",)
    with pytest.raises(CheckpointError, match=r"builtin:nope: no such built-in model; sdbatch has builtin:shapes"):
        sdbatch.load_model("builtin:nope")
    pq.write_table(pa.table({"prompt": ["a red circle on a blue background"]}), tmp_path / "t.parquet")
    rc = cli.main(["run", str(tmp_path / "t.parquet"), "--model", "builtin:nope", "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "--model builtin:nope: no such built-in model; sdbatch has builtin:shapes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    with pytest.raises(JobError, match=r"^--init builtin:nope: no such built-in model"):
        check_model("builtin:nope", "--init")  # jobs train --init
    with pytest.raises(ValueError, match=r"^builtin:nope: no such built-in model"):
        build({"model": "builtin:nope"})  # serve, before Ray starts

    monkeypatch.setattr(builtin, "FOLDER", tmp_path / "empty")  # an install without the file
    with pytest.raises(CheckpointError, match=r"builtin:shapes: its file .*shapes\.safetensors is missing from this install"):
        sdbatch.load_model("builtin:shapes")
    rc = cli.main(["run", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert NOTICE in err and "builtin:shapes: its file" in err and "missing from this install" in err


def test_native_size_is_the_trained_resolution(tiny_safetensors, tmp_path):
    assert native_size(tiny_safetensors) == 512  # no sdbatch training metadata: SD v1.x's size
    weights = read_safetensors(Path(tiny_safetensors))
    for settings, side in (({"resolution": 96}, 96), ({"resolution": 60}, 512), ("not json", 512), ({}, 512)):
        path = tmp_path / "m.safetensors"
        save_checkpoint(dict(weights), path, {"sdbatch.settings": settings if isinstance(settings, str) else json.dumps(settings)})
        assert native_size(path) == side, settings
    assert native_size("s3://bucket/model.safetensors") == 512  # remote: not downloaded for this


def test_generate_without_model_uses_the_builtin_at_its_native_size(shapes_file, tmp_path):
    run = sh("-m", "sdbatch", "generate", "a red circle on a blue background", "-o", "out.png", "--steps", "2",
             "--seed", "3", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert NOTICE in run.stderr and "not Stable Diffusion" in run.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64)
    sha = hashlib.sha256(shapes_file.read_bytes()).hexdigest()
    assert f"Size: 64x64, Model hash: {sha[:10]}" in image.text["parameters"]

    run = sh("-m", "sdbatch", "generate", "a red circle on a blue background", "-o", "wide.png", "--steps", "2",
             "--width", "128", "--model", "builtin:shapes", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert NOTICE not in run.stderr  # asked for by name: nothing to explain
    assert Image.open(tmp_path / "wide.png").size == (128, 64)


def test_jobs_run_without_model_and_its_contact_sheet(shapes_file, tmp_path):
    prompts = ["a red circle on a blue background", "a small green square on a white background, top left"]
    pq.write_table(pa.table({"prompt": prompts, "note": ["x", "y"]}), tmp_path / "t.parquet")
    run = sh("-m", "sdbatch.jobs", "run", "t.parquet", "--output", "out", "--steps", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"no --model given: using builtin:shapes, sdbatch's {NOTICE}" in run.stderr
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["settings"]["model"] == hashlib.sha256(shapes_file.read_bytes()).hexdigest()
    assert (record["settings"]["width"], record["settings"]["height"]) == (64, 64)
    assert record["model_source"] == "builtin:shapes"
    images = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert [Image.open(p).size for p in images] == [(64, 64)] * 2

    sheet = sh(str(ROOT / "scripts" / "contact_sheet.py"), "out", "-o", "sheet.png", "--scale", "1", cwd=tmp_path)
    assert sheet.returncode == 0, sheet.stderr
    page = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    first = np.asarray(Image.open(images[0]).convert("RGB"))  # ids 00000000, 00000001: the sheet's order
    assert any((page[y:y + 64, x:x + 64] == first).all() for y in range(page.shape[0] - 63) for x in range(20))

    (tmp_path / "empty").mkdir()
    empty = sh(str(ROOT / "scripts" / "contact_sheet.py"), "empty", cwd=tmp_path)
    assert empty.returncode == 2 and "empty holds no images" in empty.stderr


def test_contact_sheet_places_every_image_in_its_frame():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    frames = [RIGHT, WRONG, None, RIGHT, WRONG]
    sheet = np.asarray(contact_sheet(images, ["a b c"] * 5, frames, columns=2, scale=3, title="t"))
    found = []
    for image, frame in zip(images, frames):
        big = image.repeat(3, 0).repeat(3, 1)
        hits = [(y, x) for y in range(sheet.shape[0] - 23) for x in range(sheet.shape[1] - 23)
                if (sheet[y:y + 24, x:x + 24] == big).all()]
        assert len(hits) == 1
        y, x = hits[0]
        border = sheet[y - 1, x - 1]
        assert tuple(border) == (frame or (255, 255, 255))
        found.append(hits[0])
    assert found[0][0] == found[1][0] < found[2][0] == found[3][0] < found[4][0]  # row by row, 2 columns
    with pytest.raises(ValueError, match="differ in size"):
        contact_sheet([images[0], images[0][:4]])


def test_builtin_model_follows_seen_prompts(shapes_file):
    torch.manual_seed(0)
    model = sdbatch.load_model("builtin:shapes", dtype=torch.float32)
    prompts = shapes.evaluation_prompts(ADHERENCE_PROMPTS, held_out=False, seed=0, data_seed=0)
    images = sdbatch.generate(model, prompts, seeds=list(range(len(prompts))), steps=20, cfg_scale=7.5,
                              width=shapes.SIDE, height=shapes.SIDE, progress=False)
    summary = adherence.summarize([adherence.check(image, prompt) for image, prompt in zip(images, prompts)])
    assert summary["all_correct"] >= ADHERENCE_BAR, summary


def test_wheel_carries_the_model_and_its_card(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        (tmp_path / "src" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes((ROOT / name).read_bytes())
    source = ROOT / "sdbatch"
    for path in source.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            target = tmp_path / "src" / "sdbatch" / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(tmp_path / "src")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp_path / "dist").glob("sdbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"sdbatch/builtin/{p.name}" for p in (ROOT / "sdbatch" / "builtin").glob("shapes.*")}
    assert "sdbatch/builtin/shapes.md" in shipped and shipped <= names
