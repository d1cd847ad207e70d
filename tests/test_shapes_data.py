"""The shapes dataset (python -m sdbatch.data shapes), its prompt grammar and the adherence checker."""

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import set_env
from sdbatch.data import adherence, shapes
from sdbatch.data.__main__ import main as cli_main
from sdbatch.data.shapes import Attributes


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdbatch.data", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=120)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "train.parquet"
    assert cli_main(["shapes", str(path), "--rows", "300", "--seed", "7", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def rows(table_file):
    return pq.read_table(table_file, use_threads=False).to_pylist()


def row_attributes(row: dict) -> Attributes:
    return Attributes(row["shape"], row["color"], row["background"], row["size"], row["position"])


def test_same_seed_same_bytes_and_rows_do_not_depend_on_the_row_count(table_file, tmp_path):
    again, other = tmp_path / "again.parquet", tmp_path / "other.parquet"
    assert cli_main(["shapes", str(again), "--rows", "300", "--seed", "7", "--quiet"]) == 0
    assert again.read_bytes() == table_file.read_bytes()
    shapes.write_dataset(str(other), 300, seed=8)
    assert other.read_bytes() != table_file.read_bytes()
    first = shapes.build_table(50, seed=7)
    assert first.to_pylist() == pq.read_table(table_file, use_threads=False).slice(0, 50).to_pylist()


def test_schema_is_the_datasets_image_layout(table_file, rows):
    schema = pq.read_schema(table_file)
    assert schema.names == ["image", "text", "id", "shape", "color", "background", "size", "position"]
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    for row in rows[:20]:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
        assert row["image"]["path"] == f"{row['id']}.png"

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(table_file), split="train",
                               cache_dir=str(table_file.parent / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert first["text"] == rows[0]["text"] and first["shape"] == rows[0]["shape"]
    assert np.array_equal(np.asarray(first["image"].convert("RGB")), decode(rows[0]["image"]["bytes"]))


def test_attributes_cover_the_domain_and_large_shapes_are_centred(rows):
    assert {r["shape"] for r in rows} == set(shapes.SHAPES)
    assert {r["color"] for r in rows} == {r["background"] for r in rows} == set(shapes.COLORS)
    assert {r["position"] for r in rows} == set(shapes.POSITIONS)
    assert all(r["color"] != r["background"] for r in rows)
    assert {r["position"] for r in rows if r["size"] == "large"} == {"center"}
    assert 0.2 < np.mean([r["size"] == "large" for r in rows]) < 0.5


def test_captions_vary_and_say_what_the_image_shows(rows):
    def template(text: str) -> str:
        words = [*shapes.SHAPES, *shapes.COLORS, *shapes.SIZES, "top", "bottom", "left", "right"]
        return re.sub(r"\b(" + "|".join(words) + r")\b", "_", text)

    captions = [r["text"] for r in rows]
    assert len(set(captions)) > 200
    assert len({template(c) for c in captions}) >= 15
    assert 0.15 < np.mean([r["size"] not in c for r, c in zip(rows, captions)]) < 0.45
    assert 0.15 < np.mean([not shapes.parse_prompt(c).position for c in captions]) < 0.45
    # word order changes: the background comes first in some captions, last in others
    assert any(c.index(r["background"]) < c.index(r["shape"]) for r, c in zip(rows, captions))
    assert any(c.index(r["background"]) > c.index(r["shape"]) for r, c in zip(rows, captions))
    for row in rows:
        asked = shapes.parse_prompt(row["text"])
        truth = row_attributes(row)
        assert asked.triple == truth.triple, row["text"]
        assert asked.size in (None, truth.size) and asked.position in (None, truth.position), row["text"]


def test_held_out_triples_are_listed_and_absent(table_file, rows):
    held = shapes.held_out_triples(7)
    assert len(held) == round(0.1 * len(shapes.all_triples())) == 9
    meta = shapes.read_metadata(str(table_file))
    assert meta["held_out"] == held and meta["seed"] == 7 and meta["rows"] == 300
    assert json.loads(pq.read_schema(table_file).metadata[b"sdbatch.shapes"])["held_out"] == [list(t) for t in held]
    assert not {row_attributes(r).triple for r in rows} & set(held)
    # every pair of attributes of a held-out triple is seen in training
    seen = shapes.seen_triples(7)
    for triple in held:
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert any(t[i] == triple[i] and t[j] == triple[j] for t in seen), (triple, i, j)
    assert shapes.held_out_triples(8) != held


def test_colours_are_exact_inside_the_shape_and_around_it(rows):
    for row in rows:
        image = decode(row["image"]["bytes"])
        fx, fy = shapes.POSITIONS[row["position"]]
        centre = image[int(fy * 64), int(fx * 64)]
        assert tuple(centre) == shapes.COLORS[row["color"]], row
        corner = image[63 if fy <= 0.5 else 0, 63 if fx <= 0.5 else 0]  # the corner away from the shape
        assert tuple(corner) == shapes.COLORS[row["background"]], row
        # anti-aliased: some edge pixels are neither colour
        pure = np.all(image == shapes.COLORS[row["color"]], -1) | np.all(image == shapes.COLORS[row["background"]], -1)
        assert not pure.all() or row["shape"] == "square"


def test_checker_reads_back_the_generators_truth(rows):
    extra = list(shapes.iter_rows(100, seed=11))  # 300 + 100 images, two seeds
    cases = [(decode(r["image"]["bytes"]), row_attributes(r), r["text"]) for r in rows[:100]]
    cases += [(decode(r["png"]), row_attributes(r), r["text"]) for r in extra]
    full = [adherence.check(image, shapes.prompt_text(truth))["all_correct"] for image, truth, _ in cases]
    from_caption = [adherence.check(image, text)["all_correct"] for image, _, text in cases]
    assert np.mean(full) >= 0.99 and np.mean(from_caption) >= 0.99
    # the same picture at another size reads the same
    image, truth, _ = cases[0]
    big = np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.LANCZOS))
    assert adherence.check(big, shapes.prompt_text(truth))["all_correct"]


def test_checker_tolerates_blur_and_noise(rows):
    """Generated pictures are not crisp: a Gaussian blur (radius 1.5 px) plus noise (sigma 20)
    must not change what the checker reads."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    right = []
    for row in rows[100:160]:
        blurred = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).filter(ImageFilter.GaussianBlur(1.5)))
        noisy = np.clip(blurred + rng.normal(0, 20, blurred.shape), 0, 255).astype(np.uint8)
        right.append(adherence.check(noisy, shapes.prompt_text(row_attributes(row)))["all_correct"])
    assert np.mean(right) >= 0.95


def _mismatches(truth: Attributes) -> list[tuple[str, Attributes]]:
    """One wrong prompt per attribute (size without position, since large shapes are centred)."""
    out = [("shape", replace(truth, shape=next(s for s in shapes.SHAPES if s != truth.shape))),
           ("color", replace(truth, color=next(c for c in shapes.COLORS if c not in (truth.color, truth.background)))),
           ("background", replace(truth, background=next(c for c in shapes.COLORS if c not in (truth.color, truth.background)))),
           ("size", replace(truth, size="small" if truth.size == "large" else "large", position=None)),
           ("position", replace(truth, size=None, position=next(p for p in shapes.POSITIONS if p != truth.position)))]
    return out


def test_checker_says_wrong_for_mismatched_prompts(rows):
    for row in rows[:60]:
        image, truth = decode(row["image"]["bytes"]), row_attributes(row)
        for attribute, wrong in _mismatches(truth):
            result = adherence.check(image, shapes.prompt_text(wrong))
            assert not result["all_correct"] and not result["correct"][attribute], (row["text"], shapes.prompt_text(wrong))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not adherence.check(noise, "a small red circle on a blue background, top left")["all_correct"]
    blank = np.full((64, 64, 3), shapes.COLORS["blue"], dtype=np.uint8)
    result = adherence.check(blank, "a red circle on a blue background")
    assert result["correct"] == {"shape": False, "color": False, "background": True} and not result["all_correct"]


def test_summary_shares():
    image = shapes.render(Attributes("circle", "red", "blue", "small", "top left"))
    results = [adherence.check(image, "a small red circle on a blue background, top left"),
               adherence.check(image, "a red square on a blue background")]
    summary = adherence.summarize(results)
    assert summary["n"] == 2 and summary["all_correct"] == 0.5
    assert summary["per_attribute"]["shape"] == {"n": 2, "correct": 0.5}
    assert summary["per_attribute"]["size"] == {"n": 1, "correct": 1.0}


@pytest.mark.parametrize("text, expected", [
    ("a red circle on a blue background", Attributes("circle", "red", "blue")),
    ("a large red circle on a blue background", Attributes("circle", "red", "blue", "large")),
    ("a small green square on white, top left", Attributes("square", "green", "white", "small", "top left")),
    ("red circle, blue background", Attributes("circle", "red", "blue")),
    ("a small yellow triangle in the bottom right corner on black",
     Attributes("triangle", "yellow", "black", "small", "bottom right")),
    ("A Blue background with a white Triangle, Top-Right", Attributes("triangle", "white", "blue", None, "top right")),
    ("a black square on a green background in the middle", Attributes("square", "black", "green", None, "center")),
])
def test_parse_prompt(text, expected):
    assert shapes.parse_prompt(text) == expected
    assert shapes.parse_prompt(shapes.prompt_text(expected)) == expected


@pytest.mark.parametrize("text", [
    "a photo of a cat", "a red circle", "a red circle on a red background", "a red circle and a blue square on white",
    "a small large red circle on blue", "a red circle on blue, top left, center", "a large red circle on blue, top left",
])
def test_parse_prompt_rejects_prompts_outside_the_grammar(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        shapes.parse_prompt(text)


def test_evaluation_prompts():
    seen = shapes.evaluation_prompts(200, held_out=False, seed=1, data_seed=7)
    held = shapes.evaluation_prompts(200, held_out=True, seed=1, data_seed=7)
    assert seen == shapes.evaluation_prompts(200, held_out=False, seed=1, data_seed=7)
    assert seen != shapes.evaluation_prompts(200, held_out=False, seed=2, data_seed=7)
    assert len(seen) == len(held) == 200
    held_triples = [shapes.parse_prompt(p).triple for p in held]
    assert set(held_triples) == set(shapes.held_out_triples(7))
    assert max(held_triples.count(t) for t in set(held_triples)) - min(held_triples.count(t) for t in set(held_triples)) <= 1
    assert not {shapes.parse_prompt(p).triple for p in seen} & set(shapes.held_out_triples(7))
    parsed = [shapes.parse_prompt(p) for p in seen + held]
    assert {a.size for a in parsed} == {None, "small", "large"} and None in {a.position for a in parsed}
    assert any(p == shapes.prompt_text(Attributes(*a.triple)) for p, a in zip(seen, parsed))  # the bare form


def test_cli_exit_codes(tmp_path, capsys):
    proc = run_cli("shapes", str(tmp_path / "a.parquet"), "--rows", "0")  # the real command's status
    assert proc.returncode == 2 and "--rows: must be at least 1" in proc.stderr, proc.stderr
    proc = run_cli("shapes", str(tmp_path / "ok.parquet"), "--rows", "2", "--quiet")
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "ok.parquet"), proc.stderr
    shapes.write_dataset(str(tmp_path / "here.parquet"), 2, seed=0)  # same bytes in another process
    assert (tmp_path / "ok.parquet").read_bytes() == (tmp_path / "here.parquet").read_bytes()
    (tmp_path / "ok.parquet").unlink()
    (tmp_path / "here.parquet").unlink()
    for args, message in [
        (["shapes", str(tmp_path / "a.parquet"), "--rows", "many"], "--rows: not an integer: 'many'"),
        (["shapes", str(tmp_path / "a.parquet"), "--rows", "3", "--seed", "-1"], "--seed: must be in"),
        (["shapes", str(tmp_path / "a.csv"), "--rows", "3"], "must be a .parquet file"),
        (["shapes", str(tmp_path / "a.parquet")], "--rows"),
        (["circles", str(tmp_path / "a.parquet"), "--rows", "3"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit:
            cli_main(args)
        assert exit.value.code == 2 and message in capsys.readouterr().err, args
    assert not any(tmp_path.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["shapes", str(blocker / "a.parquet"), "--rows", "3", "--quiet"]) == 1
    assert f"cannot write {blocker / 'a.parquet'}" in capsys.readouterr().err


def test_cli_writes_to_s3(s3_endpoint, capsys):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="shapes")
    with set_env(AWS_ENDPOINT_URL=s3_endpoint):
        assert cli_main(["shapes", "s3://shapes/data/train.parquet", "--rows", "5", "--seed", "3", "--quiet"]) == 0
        assert shapes.read_metadata("s3://shapes/data/train.parquet")["held_out"] == shapes.held_out_triples(3)
    assert capsys.readouterr().out.strip() == "s3://shapes/data/train.parquet"
    body = s3.get_object(Bucket="shapes", Key="data/train.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body), use_threads=False).to_pylist() == shapes.build_table(5, 3).to_pylist()


def test_shapes_model_config_fits_the_file_budget_and_loads(tmp_path):
    import torch

    import sdbatch
    from sdbatch.model.training import CONFIGS, export_checkpoint, new_model

    path = tmp_path / "shapes.safetensors"
    export_checkpoint(new_model("shapes", seed=0), path, {})  # float32
    assert path.stat().st_size <= 25_000_000  # issue 14's cap on the built-in model's file
    model = sdbatch.load_model(path, dtype=torch.float32)
    assert model.config == CONFIGS["shapes"]  # the loader infers every size from the file
    image = sdbatch.generate(model, ["a red circle on a blue background"], seeds=[0], steps=2, width=64, height=64,
                             progress=False)
    assert image.shape == (1, 64, 64, 3)
