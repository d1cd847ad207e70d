"""Issue 13, job side: plan-time bounds, unreadable tables, exit codes by repetition, Ctrl-C, Ray's
chatter, inputs checked before anything starts, and non-finite images never recorded. Real
`python -m sdbatch.jobs` processes on a local Ray, real files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sdbatch.jobs import cli
from sdbatch.jobs import plan as planning
from sdbatch.model.weights import checkpoint_hash, read_weights, save_checkpoint, save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "float32", "--batch-size", "2"]
RAY_CHATTER = ("Token authentication is enabled", "constructor arguments in the object store",
               "Progress bars disabled", "streaming_executor", "core_worker", "(raylet)")


def jobs(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "sdbatch.jobs", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=5)


# ----------------------------------------------------------------------------- item 2: plan-time bounds


def test_out_of_range_plan_values_are_row_errors_without_allocating():
    settings = dict(planning.DEFAULTS)
    table = pa.table({"prompt": ["a", "b", "c", "d", "e"],
                      "seed": [2**63 - 2, 2**63 - 1, 5, 6, None],
                      "num_images": [2, 2, 10**12, 1, 1],
                      "width": [32, 32, 32, 10**6, 32]})
    tracemalloc.start()
    plan = planning.make_plan(table, settings)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20  # 10**12 images were never listed
    assert sorted(r["seed"] for r in plan.rows()) == sorted([2**63 - 2, 2**63 - 1, planning.derive_seed(0, "00000004-0")])
    errors = {e["row"]: e["error"] for e in plan.errors.to_pylist()}
    assert set(errors) == {1, 2, 3}
    assert errors[1].startswith("Row 1 (id '00000001'):") and "past 2^63 - 1" in errors[1]
    assert errors[2].startswith("Row 2 ") and "num_images 1000000000000 is more than" in errors[2]
    assert errors[3].startswith("Row 3 ") and "width 1000000 is larger than" in errors[3]
    # every planned seed fits the manifest's int64 and torch's generator
    pa.array([r["seed"] for r in plan.rows()], pa.int64())
    for r in plan.rows():
        torch.Generator().manual_seed(r["seed"])


def test_a_plan_larger_than_the_driver_can_hold_is_refused():
    table = pa.table({"prompt": ["a"] * 300, "num_images": [planning.MAX_NUM_IMAGES] * 300})
    with pytest.raises(cli.JobError, match=r"asks for 30000000 images; one job plans at most"):
        planning.make_plan(table, dict(planning.DEFAULTS))


# ----------------------------------------------------------------------------- item 4: unreadable tables


def test_unreadable_table_files_exit_2_naming_the_file(tmp_path, tiny, capsys):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"] * 50}), good)
    data = good.read_bytes()
    cases = {"empty.parquet": b"", "cut.parquet": data[: len(data) // 2], "text.parquet": b"prompt\na cat\n" * 10}
    for name, content in cases.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "good.parquet").write_bytes(data)
        (folder / name).write_bytes(content)  # e.g. the 0-byte file Spark leaves in a folder
        rc = cli.main(["run", str(folder), "--model", str(tiny), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"{folder / name}: not a readable Parquet file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # `status` reads the manifest's files the same way
    out = tmp_path / "done"
    (out / "manifest").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"settings": {}, "rows": 1}))
    (out / "manifest" / "part-0.parquet").write_bytes(b"")
    assert cli.main(["status", str(out)]) == 2
    assert "part-0.parquet: not a readable Parquet file" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_table_without_read_permission_exits_2(tmp_path, tiny, capsys):
    table = tmp_path / "locked.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), table)
    table.chmod(0)
    assert cli.main(["run", str(table), "--model", str(tiny), "--output", str(tmp_path / "out")]) == 2
    assert f"{table}: permission denied" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 5: exit codes, repeated


def test_exit_codes_hold_on_every_repetition(tmp_path, tiny):
    out = tmp_path / "big"
    (out / "manifest").mkdir(parents=True)
    n = 1_000_000
    pq.write_table(pa.table({"id": [f"{i:08d}" for i in range(n)], "seed": np.arange(n)}), out / "manifest" / "part-a.parquet")
    (out / "run.json").write_text(json.dumps({"settings": {"model": "x"}, "rows": n + 5}))
    for _ in range(6):
        run = jobs("status", str(out))
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["done:", str(n), "errored:", "0", "remaining:", "5"]
    # refusing other settings: exit 2, every time
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "t.parquet")
    for _ in range(2):
        run = jobs("run", str(tmp_path / "t.parquet"), "--model", str(tiny), "--output", str(out))
        assert run.returncode == 2 and "other generation settings" in run.stderr, run.stderr


# ----------------------------------------------------------------------------- a real run: items 1, 2, 7, 14


def test_run_records_edges_hides_ray_chatter_and_identifies_the_model_by_hash(tmp_path, tiny):
    work = tmp_path / "checkout"
    (work / "models").mkdir(parents=True)
    model = work / "models" / "tiny.safetensors"
    model.write_bytes(tiny.read_bytes())
    upright = np.zeros((32, 32, 3), np.uint8)
    upright[:16] = (200, 40, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, 1).copy()).save(work / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(np.rot90(upright, 1).copy()).save(work / "sideways.jpg", quality=95)  # no EXIF: as stored
    Image.fromarray(upright).save(work / "upright.jpg", quality=95)
    Image.fromarray(upright).save(work / "upright.png")
    (work / "cut.png").write_bytes((work / "upright.png").read_bytes()[:60])
    images = [str(work / n) for n in ("phone.jpg", "sideways.jpg", "upright.jpg", "cut.png")]
    pq.write_table(pa.table({
        "id": ["edge", "over", "huge", "phone", "sideways", "upright", "cut"],
        "prompt": ["a cat"] * 7,
        "seed": [2**63 - 2, 2**63 - 1, 1, 7, 7, 7, 7],
        "num_images": [2, 2, 10**12, None, None, None, None],
        "init_image": [None, None, None, *images],
        "strength": [None, None, None, 0.5, 0.5, 0.5, 0.5],
    }), work / "prompts.parquet")

    # relative paths, as pasted from inside a checkout
    run = jobs("run", "prompts.parquet", "--model", "models/tiny.safetensors", "--output", "out", *FAST, cwd=work)
    assert run.returncode == 1, run.stderr  # some rows failed
    for chatter in RAY_CHATTER:
        assert chatter not in run.stderr, run.stderr
    assert "rows 2/8 (2 errors)" in run.stderr and "done: 5, errored: 3, remaining: 0" in run.stderr

    out = work / "out"
    manifest = pq.read_table(out / "manifest").to_pydict()
    assert sorted(zip(manifest["id"], manifest["seed"])) == [("edge-0", 2**63 - 2), ("edge-1", 2**63 - 1),
                                                             ("phone", 7), ("sideways", 7), ("upright", 7)]
    errors = dict(zip(*pq.read_table(out / "errors", columns=["id", "error"]).to_pydict().values()))
    assert set(errors) == {"over", "huge", "cut"} and "cut.png" in errors["cut"]
    pngs = {i: np.asarray(Image.open(p)).astype(int) for i, p in zip(manifest["id"], manifest["image"])}
    # the EXIF-rotated photo is read upright: far closer to the upright image's result than the stored pixels'
    assert np.abs(pngs["phone"] - pngs["upright"]).mean() < np.abs(pngs["sideways"] - pngs["upright"]).mean() / 3

    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["model"] == checkpoint_hash(tiny)
    # the same weights by another (absolute) path are the same model: nothing to redo, nothing refused
    again = jobs("run", str(work / "prompts.parquet"), "--model", str(tiny), "--output", str(out), *FAST)
    assert again.returncode == 1 and "other generation settings" not in again.stderr, again.stderr
    assert "0 to generate" in again.stderr


def test_inputs_the_job_cannot_see_are_refused_before_run_json(tmp_path, tiny):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "t.parquet")
    run = jobs("run", "t.parquet", "--model", "out/model.safetensors", "--output", "o", cwd=tmp_path)
    assert run.returncode == 2
    assert f"--model out/model.safetensors: no such file or folder (relative to {tmp_path}" in run.stderr
    assert not (tmp_path / "o").exists()
    run = jobs("run", "nope.parquet", "--model", str(tiny), "--output", "o", cwd=tmp_path)
    assert run.returncode == 2 and f"prompt table nope.parquet does not exist (relative to {tmp_path}" in run.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- item 3: non-finite images


def test_non_finite_images_become_row_errors(tmp_path, tiny):
    sd = read_weights(tiny)
    sd["model.diffusion_model.input_blocks.0.0.bias"] = torch.full_like(sd["model.diffusion_model.input_blocks.0.0.bias"], 1e5)
    save_checkpoint(sd, tmp_path / "overflow.safetensors")
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "t.parquet")
    args = [a if a != "float32" else "float16" for a in FAST]
    run = jobs("run", str(tmp_path / "t.parquet"), "--model", str(tmp_path / "overflow.safetensors"),
               "--output", str(tmp_path / "out"), *args)
    assert run.returncode == 1, run.stderr
    errors = pq.read_table(tmp_path / "out" / "errors").to_pydict()
    assert errors["id"] == ["00000000"]
    assert all("non-finite (NaN or inf) in float16 and again in float32" in e for e in errors["error"])
    assert not (tmp_path / "out" / "manifest").exists() or pq.read_table(tmp_path / "out" / "manifest").num_rows == 0
    assert not list((tmp_path / "out").glob("images/*.png"))


# ----------------------------------------------------------------------------- item 6: Ctrl-C


def test_ctrl_c_reports_what_was_recorded_and_exits_130(tmp_path, tiny):
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(60)]}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "sdbatch.jobs", "run", str(tmp_path / "t.parquet"), "--model",
                             str(tiny), "--output", str(out), *FAST[:-2], "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list((out / "manifest").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list((out / "manifest").glob("*.parquet")), "nothing recorded in time"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    recorded = pq.read_table(out / "manifest").num_rows
    assert recorded >= 1
    assert f"interrupted: {recorded} images and 0 errors of 60 rows are recorded in {out}" in err
    assert "run the same command again to resume" in err
    status = jobs("status", str(out))
    assert status.stdout.split()[:2] == ["done:", str(recorded)]


# ----------------------------------------------------------------------------- item 13: the headline, pasted


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    return after[after.index("```bash\n") + 8 : after.index("```\n", after.index("```bash\n") + 8)]


def test_the_readme_ray_job_submit_block_works_pasted_into_a_fresh_shell(tmp_path, tiny):
    """The README's `ray start --head` + `ray job submit` block, run by bash with nothing set, in a
    HOME that already holds a token, as any earlier local run leaves (the case of the report: the
    head then requires it, and the CLI sent none). Changed only where it must be: the
    head gets its own ports and blocks in the background (never `ray stop`: other Ray clusters may
    share this host), and the job reads a local table and model instead of S3."""
    from conftest import free_port
    from ray_fixtures import stop_process_group

    block = readme_block("### On a Ray cluster: `ray job submit`")
    assert "export RAY_AUTH_MODE=token" in block and "ray start --head" in block
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), tmp_path / "t.parquet")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(os.urandom(16).hex())
    for attempt in ("token exists",):
        temp, dash, pidfile = Path(f"/tmp/sdbh{os.getpid()}{attempt[0]}"), free_port(), tmp_path / f"{attempt[0]}.pid"
        ports = " ".join(f"--{name}={free_port()}" for name in (
            "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
            "node-manager-port", "object-manager-port", "runtime-env-agent-port", "metrics-export-port"))
        start = (f"setsid ray start --head --block --temp-dir={temp} --dashboard-port={dash} "
                 f"--dashboard-host=127.0.0.1 --include-dashboard=true {ports} --num-cpus=2 --disable-usage-stats "
                 f"> {tmp_path}/start.log 2>&1 & echo $! > {pidfile}\n"
                 # until the job API answers (the dashboard alone answers 401 to anything before that)
                 f"for i in $(seq 120); do ray job list --address http://127.0.0.1:{dash} > /dev/null 2>&1 && break; "
                 f"sleep 1; done")
        job = (f"python -m sdbatch.jobs run {tmp_path / 't.parquet'} --model {tiny} "
               f"--output {tmp_path / attempt.replace(' ', '-')} {' '.join(FAST)}\n")
        script = block.replace("ray start --head", start, 1).replace("127.0.0.1:8265", f"127.0.0.1:{dash}")
        script = script[: script.index("python -m sdbatch.jobs run")] + job
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home)}
        try:
            run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        finally:
            if pidfile.exists():
                stop_process_group(_Pid(int(pidfile.read_text())))
            shutil.rmtree(temp, ignore_errors=True)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "succeeded" in run.stdout + run.stderr and "Missing authentication token" not in run.stderr
        assert pq.read_table(tmp_path / attempt.replace(" ", "-") / "manifest").num_rows == 2
        assert (home / ".ray" / "auth_token").is_file()


class _Pid:
    """What stop_process_group needs of a Popen, for a process this test did not start itself."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self):
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return 0
        return None

    def wait(self, timeout=None):
        deadline = time.monotonic() + (30 if timeout is None else timeout)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ray start", timeout)
            time.sleep(0.2)
        return 0
