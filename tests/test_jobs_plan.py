"""The batch job's planning and output pieces, without Ray: table checks, ids and seeds,
row problems, file names for ids, PNG parameters, storage retries, and the CLI failing on a
bad table before it starts anything."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdbatch import storage
from sdbatch.jobs import cli, plan as planning
from sdbatch.a1111 import a1111_parameters, encode_png
from sdbatch.actors import safe_name

SETTINGS = dict(planning.DEFAULTS, steps=2, width=64, height=64, model="m", dtype="auto")


def plan_of(**columns):
    return planning.make_plan(pa.table(columns), SETTINGS)


def test_ids_and_seeds_are_derived_stably():
    plan = plan_of(prompt=["a", "b", "c"], num_images=[None, 3, None], seed=[None, 100, None])
    ids = [r["id"] for r in plan.rows()]
    assert ids == ["00000000", "00000001-0", "00000001-1", "00000001-2", "00000002"]
    seeds = {r["id"]: r["seed"] for r in plan.rows()}
    assert [seeds[f"00000001-{j}"] for j in range(3)] == [100, 101, 102]
    digest = hashlib.sha256(b"0:00000000").digest()
    assert seeds["00000000"] == int.from_bytes(digest[:4], "big")
    # another --seed gives other seeds; the same table and --seed give the same plan
    other = planning.make_plan(pa.table({"prompt": ["a", "b", "c"]}), dict(SETTINGS, seed=1))
    assert other.rows()[0]["seed"] != seeds["00000000"]
    assert plan_of(prompt=["a", "b", "c"], num_images=[None, 3, None], seed=[None, 100, None]).rows() == plan.rows()


def test_rows_override_defaults_and_integer_ids_become_strings():
    plan = plan_of(prompt=["a", "b"], id=[7, 8], steps=[3, None], width=[128, None], sampler=[None, "ddim"])
    a, b = plan.rows()
    assert (a["id"], a["steps"], a["width"], a["sampler"]) == ("7", 3, 128, SETTINGS["sampler"])
    assert (b["id"], b["steps"], b["width"], b["sampler"]) == ("8", 2, 64, "ddim")


def test_row_problems_become_errors_naming_the_problem():
    plan = plan_of(
        id=["ok", "empty", "null", "w", "steps", "sampler", "strength", "k", "ok"],
        prompt=["p", "  ", None, "p", "p", "p", "p", "p", "again"],
        width=[64, 64, 64, 60, 64, 64, 64, 64, 64],
        steps=[2, 2, 2, 2, 0, 2, 2, 2, 2],
        sampler=[None, None, None, None, None, "nope", None, None, None],
        init_image=[None, None, None, None, None, None, "x.png", None, None],
        strength=[None, None, None, None, None, None, 1.5, None, None],
        num_images=[None, None, None, None, None, None, None, 0, None],
    )
    assert [r["id"] for r in plan.rows()] == ["ok"]
    errors = {e["row"]: e["error"] for e in plan.errors.to_pylist()}
    assert "prompt is empty" in errors[1]
    assert "prompt is null" in errors[2]
    assert "width 60 is not a positive multiple of 8" in errors[3]
    assert "steps 0" in errors[4]
    assert "sampler 'nope' is unknown" in errors[5]
    assert "strength 1.5 is outside (0, 1]" in errors[6]
    assert "num_images 0" in errors[7]
    assert "already used by row 0" in errors[8]


def test_batches_have_one_shape_and_do_not_depend_on_what_is_done():
    plan = plan_of(prompt=list("abcdefg"), width=[64, 128, 64, 64, 128, 64, 64])
    batches = batch_rows(plan, 2)
    assert all(len({planning.shape_key(r) for r in b}) == 1 for b in batches)
    assert sorted(r["id"] for b in batches for r in b) == sorted(r["id"] for r in plan.rows())
    assert [len(b) for b in batches] == [2, 2, 1, 2]
    # rows appended to the table only join the last batch of their shape
    more = plan_of(prompt=list("abcdefgh"), width=[64, 128, 64, 64, 128, 64, 64, 64])
    assert [[r["id"] for r in b] for b in batch_rows(more, 2)][:2] == [[r["id"] for r in b] for b in batches][:2]


def batch_rows(plan, batch_size):
    batches = planning.make_batches(plan, batch_size)
    return [plan.rows(batches.order[a:b]) for a, b in zip(batches.starts[:-1], batches.starts[1:])]


def test_safe_names_stay_inside_the_folder_and_distinct():
    ids = ["plain-1_x.y", "../evil", "..", ".hidden", "a/b", "a\\b", "a_b", "a:b", "é", "x" * 300, "end."]
    names = [safe_name(i) for i in ids]
    assert names[0] == "plain-1_x.y"
    assert len(set(names)) == len(ids)
    for n in names:
        assert "/" not in n and "\\" not in n and not n.startswith(".") and n not in ("", "..")
        assert len(n) <= 100
        assert os.path.dirname(os.path.normpath(os.path.join("/out/images", n + ".png"))) == "/out/images"


def test_png_carries_a1111_parameters(tmp_path):
    row = dict(prompt="a cat\non two lines", negative_prompt="blurry", steps=20, sampler="dpmpp_2m_karras",
               cfg_scale=7.0, seed=42, width=64, height=32, init_image=None, strength=0.8)
    png = encode_png(np.zeros((32, 64, 3), np.uint8), a1111_parameters(row, "0123456789abcdef"))
    (tmp_path / "x.png").write_bytes(png)
    text = Image.open(tmp_path / "x.png").text["parameters"]
    assert text == ("a cat\non two lines\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, "
                    "CFG scale: 7, Seed: 42, Size: 64x32, Model hash: 0123456789")
    assert encode_png(np.zeros((32, 64, 3), np.uint8), text) == png  # deterministic bytes
    for empty in ("", None):
        assert a1111_parameters(row | dict(negative_prompt=empty), "0123456789abcdef") == (
            "a cat\non two lines\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 64x32, Model hash: 0123456789")


def test_retry_retries_transient_errors_only(monkeypatch):
    monkeypatch.setattr(storage, "BASE_DELAY_S", 0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"

    assert storage.retry(flaky) == "ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing)
    assert len(calls) == 1


def test_table_files_folder_and_glob(tmp_path):
    for name in ("b.parquet", "a.parquet", "_SUCCESS", ".hidden.parquet"):
        pq.write_table(pa.table({"prompt": [name]}), tmp_path / name)
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"prompt": ["c"]}), tmp_path / "sub" / "c.parquet")
    _, files = planning.table_files(str(tmp_path))
    assert [Path(f).name for f in files] == ["a.parquet", "b.parquet", "c.parquet"]
    _, files = planning.table_files(str(tmp_path / "*.parquet"))
    assert [Path(f).name for f in files] == ["a.parquet", "b.parquet"]
    assert planning.read_table(str(tmp_path)).column("prompt").to_pylist() == ["a.parquet", "b.parquet", "c"]


@pytest.mark.parametrize("columns, message", [
    ({"prompt": [1]}, "column 'prompt' has type int64; it must be string"),
    ({"prompt": ["a"], "steps": [2.5]}, "column 'steps' has type double; it must be integer"),
    ({"prompt": ["a"], "seed": ["1"]}, "column 'seed' has type string; it must be integer"),
    ({"prompt": ["a"], "image": ["x"]}, "column 'image' clashes"),
])
def test_bad_column_types_fail_naming_the_column(tmp_path, capsys, columns, message, tiny_safetensors):
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    rc = cli.main(["run", str(tmp_path / "t.parquet"), "--model", str(tiny_safetensors), "--output", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "t.parquet" in err
    assert not (tmp_path / "out").exists()


def test_unknown_sampler_flag_fails_before_anything_is_written(tmp_path, capsys):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "t.parquet")
    rc = cli.main(["run", str(tmp_path / "t.parquet"), "--model", "m.safetensors", "--output", str(tmp_path / "out"),
                    "--sampler", "plms"])
    assert rc == 2
    assert "--sampler 'plms' is unknown; use one of ddpm, ddim" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0 is outside [1, 1000]"),
    (["--width", "65"], "--width 65 is not a positive multiple of 8"),
    (["--cfg-scale", "nan"], "--cfg-scale nan is not a finite number"),
])
def test_bad_option_values_fail_before_anything_is_written(tmp_path, capsys, tiny_safetensors, flags, message):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "t.parquet")
    rc = cli.main(["run", str(tmp_path / "t.parquet"), "--model", str(tiny_safetensors), "--output",
                   str(tmp_path / "out"), *flags])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no row error recorded for a bad option


def test_a_model_file_that_is_not_a_checkpoint_fails_before_anything_is_written(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "t.parquet")
    (tmp_path / "notes.md").write_text("# not a model\n")
    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))  # not SD
    for name, message in (("notes.md", "not a PyTorch checkpoint"),
                          ("other.safetensors", "not a Stable Diffusion v1.x checkpoint")):
        rc = cli.main(["run", str(tmp_path / "t.parquet"), "--model", str(tmp_path / name), "--output",
                       str(tmp_path / "out")])
        assert rc == 2
        err = capsys.readouterr().err
        assert name in err and message in err
        assert not (tmp_path / "out").exists()

def test_missing_prompt_column_fails_before_anything_starts(tmp_path, tiny_safetensors):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    # RAY_ADDRESS points nowhere: reaching Ray would hang or fail differently
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-m", "sdbatch.jobs", "run", str(tmp_path / "t.parquet"),
                           "--model", str(tiny_safetensors), "--output", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "has no 'prompt' column (its columns: text)" in proc.stderr and "t.parquet" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_other_safeguards_into_the_same_out_are_refused(tmp_path, capsys, tiny_safetensors):
    # a table whose one row is an error: run.json is written, nothing goes to Ray
    pq.write_table(pa.table({"prompt": ["a"], "width": [60]}), tmp_path / "t.parquet")
    args = ["run", str(tmp_path / "t.parquet"), "--model", str(tiny_safetensors), "--output", str(tmp_path / "out")]
    assert cli.main([*args, "--no-watermark"]) == 1
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "watermark False -> True" in capsys.readouterr().err
    assert cli.main([*args, "--no-watermark"]) == 1  # the same settings resume
