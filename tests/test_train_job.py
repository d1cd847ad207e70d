"""The training job end to end on a real local Ray head (tests/ray_fixtures.py) with real Ray
Train and Ray Data: a tiny model trained from scratch (the loss falls), fine-tuning a checkpoint
from S3 into S3, the VAE alone, resume after the driver or a worker is killed (bit for bit), a
non-finite loss, bad rows and bad tables, and the preprocessing's determinism."""

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from ray_fixtures import ray_head  # noqa: F401  (fixture)
from sdbatch.jobs.cli import main
from sdbatch.jobs.train_worker import worker_seed
from sdbatch.jobs.train_data import decode_rows, make_batch
from sdbatch.model.weights import PREFIXES, read_safetensors, save_random_checkpoint

# the tiny model at 32x32 (4x4 latents), one sample-step per optimizer step
FAST = ["--resolution", "32", "--batch-size", "4", "--grad-accum", "1", "--learning-rate", "1e-3"]


def png(i: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A flat background with a circle (odd i) or a square (even i), colours from i."""
    rng = np.random.default_rng(i)
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw, colour = ImageDraw.Draw(im), tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if i % 2 else draw.rectangle)([8, 6, 36, 32], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_table(path: Path, n: int = 8, **extra) -> Path:
    """n rows of Hugging Face datasets' image structs and captions, row groups of 4."""
    columns = dict(image=[{"bytes": png(i), "path": f"{i}.png"} for i in range(n)],
                   text=["a circle" if i % 2 else "a square" for i in range(n)])
    columns.update(extra)
    pq.write_table(pa.table(columns), path, row_group_size=4)
    return path


def train(data, out, *extra, capsys=None):
    rc = main(["train", str(data), "--output", str(out), *FAST, *map(str, extra)])
    return rc, (capsys.readouterr().err if capsys else "")


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "sdbatch.jobs", "train", *map(str, args), *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parts_of(path) -> dict[str, dict[str, torch.Tensor]]:
    sd = read_safetensors(Path(path))
    return {name: {k: v for k, v in sd.items() if k.startswith(prefix)} for name, prefix in PREFIXES.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_errors(folder: Path):
    return pa.concat_tables([pq.read_table(p, use_threads=False) for p in sorted(folder.glob("*.parquet"))]).to_pandas()


# ----------------------------------------------------------------------------- from scratch


def test_from_scratch_loss_halves_with_samples_log_and_bad_rows(ray_head, tmp_path, capsys):
    from sdbatch import load_model

    n = None
    images = [{"bytes": png(i), "path": f"{i}.png"} for i in range(8)] + [{"bytes": b"not a png", "path": "x.png"},
                                                                         {"bytes": png(9), "path": "9.png"}]
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table(dict(image=images, text=[*("a circle" if i % 2 else "a square" for i in range(8)), "bad", n],
                                 id=[f"r{i}" for i in range(10)])), data, row_group_size=4)
    (tmp_path / "prompts.txt").write_text("a circle\n\na square\n")
    out = tmp_path / "out"
    rc, err = train(data, out, "--config", "tiny", "--steps", "100", "--checkpoint-every", "50",
                    "--validation-prompts", tmp_path / "prompts.txt", capsys=capsys)
    assert rc == 0, err

    log = pq.read_table(out / "train_log.parquet").to_pandas()
    assert list(log["step"]) == list(range(1, 101))
    assert {"loss", "learning_rate", "grad_norm", "samples_per_s", "wall_s"} <= set(log.columns)
    assert log["loss"].iloc[-20:].mean() <= 0.5 * log["loss"].iloc[:5].mean(), log["loss"].describe()

    # the bad rows: recorded with a sentence, their columns kept; training went on without them
    errors = read_errors(out / "errors").set_index("id")
    assert sorted(errors.index) == ["r8", "r9"]
    assert "cannot be read" in errors.loc["r8", "error"] and errors.loc["r8", "row"] == 8
    assert "caption ('text') is null" in errors.loc["r9", "error"] and pd.isna(errors.loc["r9", "text"])

    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-000050.png", "step-000100.png"]
    assert Image.open(out / "samples" / grids[-1]).size == (64, 32)  # two prompts side by side
    assert Image.open(out / "loss.png").size[0] > 300

    model = load_model(out / "model.safetensors")  # the exported model runs
    assert model.hash == json.loads((out / "train.json").read_text())["model_sha256"]
    from sdbatch import generate

    assert generate(model, ["a circle"], seeds=[0], steps=2, width=32, height=32, progress=False).shape == (1, 32, 32, 3)


# ----------------------------------------------------------------------------- fine-tuning, S3


def test_finetune_from_and_to_s3_changes_only_the_trained_parts(ray_head, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()  # AWS_ENDPOINT_URL points at the moto server
    fs.mkdir("train")
    init = save_random_checkpoint(tmp_path / "init.safetensors", seed=3)
    fs.put_file(str(init), "train/init.safetensors")
    fs.put_file(str(write_table(tmp_path / "data.parquet")), "train/data/part-0.parquet")

    rc, _ = train("s3://train/data/", "s3://train/out", "--init", "s3://train/init.safetensors",
                  "--parts", "text_encoder", "--steps", "3", "--checkpoint-every", "2", "--cache-latents")
    assert rc == 0
    fs.get_file("train/out/model.safetensors", str(tmp_path / "model.safetensors"))
    before, after = parts_of(init), parts_of(tmp_path / "model.safetensors")
    assert same(before["unet"], after["unet"]) and same(before["vae"], after["vae"])
    assert not same(before["text_encoder"], after["text_encoder"])
    metadata = json.loads(read_header(tmp_path / "model.safetensors"))["__metadata__"]
    assert metadata["sdbatch.base_model"] == sha256(init) and metadata["sdbatch.steps"] == "3"
    assert fs.exists("train/out/train_log.parquet") and fs.exists("train/out/loss.png")
    assert any("checkpoint_" in p for p in fs.ls("train/out/checkpoints"))


def read_header(path) -> str:
    raw = Path(path).read_bytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")].decode()


def test_vae_alone_on_two_ddp_workers(ray_head, tmp_path, capsys):
    from sdbatch.model.training import new_model

    out = tmp_path / "out"
    rc, err = train(write_table(tmp_path / "data.parquet"), out, "--config", "tiny", "--parts", "vae", "--steps", "2",
                    "--checkpoint-every", "1", "--seed", "5", "--workers", "2", capsys=capsys)
    assert rc == 0, err
    assert "on 2 worker(s)" in err
    fresh = new_model("tiny", 5)
    after = parts_of(out / "model.safetensors")
    for name, prefix in PREFIXES.items():
        start = {prefix + k: v for k, v in getattr(fresh, name).state_dict().items()}
        assert same(start, after[name]) == (name != "vae"), name


# ----------------------------------------------------------------------------- resume, faults


RESUME = ["--config", "tiny", "--steps", "8", "--checkpoint-every", "2", "--random-crop", "--flip", "--snr-gamma", "5"]


@pytest.fixture(scope="module")
def uninterrupted(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_table(tmp / "data.parquet", n=6)
    assert train(data, tmp / "out", *RESUME)[0] == 0
    return data, tmp / "out"


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until Ray Train has recorded a checkpoint of the run in OUT."""
    snapshot, deadline = out / "checkpoints" / "checkpoint_manager_snapshot.json", time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(snapshot.read_text())["latest_checkpoint_result"]:
                return
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def assert_same_run(out: Path, reference: Path) -> None:
    assert sha256(out / "model.safetensors") == sha256(reference / "model.safetensors")
    losses = [pq.read_table(o / "train_log.parquet").column("loss").to_pylist() for o in (out, reference)]
    assert losses[0] == losses[1]


def run_killing(data, out: Path, kill) -> tuple[int, str]:
    """Runs the RESUME command in a subprocess, calls kill(proc) once Ray Train has recorded a
    checkpoint, and waits for the end: (exit status, output)."""
    proc = cli(data, "--output", out, *RESUME)
    try:
        wait_for_checkpoint(out, proc)
        kill(proc)
        output, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    return proc.returncode, output


def test_driver_killed_then_rerun_resumes_bit_for_bit(uninterrupted, tmp_path, capsys):
    data, reference = uninterrupted
    out = tmp_path / "out"
    run_killing(data, out, lambda proc: proc.send_signal(signal.SIGKILL))
    assert not (out / "model.safetensors").exists()  # killed mid-run
    rc, err = train(data, out, *RESUME, capsys=capsys)
    assert rc == 0, err
    assert_same_run(out, reference)


def test_worker_killed_run_completes_bit_for_bit(uninterrupted, ray_head, tmp_path):
    from ray.util.state import list_actors

    def kill_the_worker(proc):
        workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")], address=ray_head.dashboard)
                   if a.class_name == "RayTrainWorker"]
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGKILL)

    data, reference = uninterrupted
    rc, output = run_killing(data, tmp_path / "out", kill_the_worker)
    assert rc == 0, output
    assert "resumed from the checkpoint of step" in output
    assert_same_run(tmp_path / "out", reference)


def test_nonfinite_loss_stops_keeping_the_checkpoint_then_other_settings_refused(ray_head, tmp_path, capsys):
    data, out = write_table(tmp_path / "data.parquet"), tmp_path / "out"
    args = ["--config", "tiny", "--steps", "6", "--checkpoint-every", "1"]
    rc, err = train(data, out, *args, "--learning-rate", "1e30", capsys=capsys)
    assert rc == 1
    message = err[err.index("error: the loss became"):]
    assert "--learning-rate" in message and str(out / "checkpoints") in message
    stopped = json.loads((out / "stopped.json").read_text())["step"]
    assert 1 < stopped <= 6 and not (out / "model.safetensors").exists()
    log = pq.read_table(out / "train_log.parquet").to_pandas()
    assert list(log["step"]) == list(range(1, stopped)) and np.isfinite(log["loss"]).all()

    before = sorted(p for p in out.rglob("*"))
    rc, err = train(data, out, *args, "--learning-rate", "1e-4", capsys=capsys)
    assert rc == 2 and "learning_rate 1e+30 -> 0.0001" in err and "--overwrite" in err
    assert sorted(p for p in out.rglob("*")) == before


# ----------------------------------------------------------------------------- tables and preprocessing


def test_bad_tables_exit_2_naming_file_and_column(tmp_path, capsys):
    no_image = tmp_path / "no_image.parquet"
    pq.write_table(pa.table(dict(picture=[png(0)], text=["a"])), no_image)
    no_caption = write_table(tmp_path / "no_caption.parquet", n=1)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")  # as Spark and Dask leave them
    for table, extra, words in [
        (no_image, [], [str(no_image), "image column 'image'", "picture"]),
        (no_caption, ["--caption-column", "caption"], [str(no_caption), "caption column 'caption'"]),
        (tmp_path / "missing.parquet", [], ["training table", "does not exist"]),
        (empty, [], [str(empty), "not a readable Parquet file"]),
        (no_caption, ["--init", str(tmp_path / "nope.safetensors")],
         ["--init", "nope.safetensors", "no such file"]),
        (no_caption, ["--init", str(no_image)], ["--init", "not a PyTorch checkpoint"]),
    ]:
        extra = extra if "--init" in extra else ["--config", "tiny", *extra]
        rc = main(["train", str(table), "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()
    assert main(["train", str(no_caption), "--output", str(tmp_path / "out")]) == 2  # neither --init nor --config
    assert "exactly one of --init" in capsys.readouterr().err


def test_preprocessing_is_deterministic_for_a_seed(tmp_path):
    wide = io.BytesIO()
    Image.new("RGB", (96, 64), (255, 0, 0)).save(wide, format="PNG")
    table = pa.table(dict(image=[wide.getvalue(), png(1)], text=["red", "circle"]))
    samples, errors = decode_rows(table, first=10, resolution=32, caption_column="text")
    assert not errors and [s["id"] for s in samples] == ["00000010", "00000011"]
    assert (samples[0]["width"], samples[0]["height"]) == (48, 32)  # shorter side to the resolution

    def batch(seed):
        return make_batch(samples, 32, True, True, torch.Generator().manual_seed(worker_seed(seed, 0)))

    first = batch(7)
    assert first.shape == (2, 3, 32, 32) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1 and torch.equal(first[0, 0], torch.ones(32, 32))
    assert torch.equal(batch(7), first)
    assert any(not torch.equal(batch(s), first) for s in (8, 9, 10))
    centre = make_batch(samples, 32, False, False, torch.Generator())
    circle = np.asarray(Image.open(io.BytesIO(png(1))).convert("RGB").resize((38, 32), Image.Resampling.LANCZOS))
    assert torch.equal(centre[1], torch.from_numpy(circle[:, 3:35].copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_more_steps_continue_the_run_other_changes_are_refused():
    from sdbatch.jobs.train import settings_change

    before = dict(steps=10, learning_rate=1e-4, parts=["unet"])
    assert settings_change(before, dict(before, steps=25)) == ""
    assert settings_change(before, dict(before, steps=5)) == "steps 10 -> 5"
    assert settings_change(before, dict(before, steps=25, learning_rate=2e-4)) == "learning_rate 0.0001 -> 0.0002"


@pytest.mark.parametrize("option", [["--parts", "vae"], ["--flip"], ["--random-crop"]])
def test_cache_latents_refused_where_pixels_or_vae_change(tmp_path, capsys, option):
    rc, err = train(write_table(tmp_path / "data.parquet"), tmp_path / "out", "--config", "tiny", "--cache-latents",
                    *option, capsys=capsys)
    assert rc == 2 and "--cache-latents" in err and option[-1] in err
