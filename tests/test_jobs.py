"""The batch job end to end on a real local Ray head (tests/ray_fixtures.py): outputs, row
errors, unsafe ids, resume, refusing other settings, faults (actor killed, driver SIGKILLed),
S3 for table, model and outputs, and `ray job submit` with token authentication."""

import hashlib
import json
import os
import shutil
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
from PIL import Image

from ray_fixtures import ray_head  # noqa: F401  (fixture)
from sdbatch.errors import JobError
from sdbatch.jobs import cli as jobs_cli, common, plan as planning

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "euler", "--batch-size", "2",
        "--workers", "1"]


def write_table(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def read_parts(folder: Path):
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, use_threads=False) for f in files],
                            promote_options="permissive").to_pandas()


def run(table, out, model, *extra, capsys=None):
    rc = jobs_cli.main(["run", str(table), "--model", str(model), "--output", str(out), *FAST, *extra])
    return rc, (capsys.readouterr().err if capsys else "")


def cli(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "sdbatch.jobs", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- a job with everything


def test_job_outputs_errors_unsafe_ids_status_and_rerun(ray_head, tiny_safetensors, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    (tmp_path / "not-an-image.png").write_text("hello")
    n = None
    table = write_table(
        tmp_path / "prompts.parquet",
        id=["a", "b", "../evil", "x/y\\z", "..", "img", "bad-init", "empty", "w", "steps", "sampler", "a"],
        prompt=["a red cube", "a blue ball", "escape", "slashes", "dots", "img2img", "p", "", "p", "p", "p", "dup"],
        negative_prompt=[n, "blurry", n, n, n, n, n, n, n, n, n, n],
        seed=[n, 1234, n, n, n, n, n, n, n, n, n, n],
        num_images=[n, 2, n, n, n, n, n, n, n, n, n, n],
        width=[n, n, n, n, n, n, n, n, 60, n, n, n],
        steps=[n, n, n, n, n, n, n, n, n, 0, n, n],
        sampler=[n, n, n, n, n, n, n, n, n, n, "nope", n],
        init_image=[n, n, n, n, n, str(init), str(tmp_path / "not-an-image.png"), n, n, n, n, n],
        strength=[n, n, n, n, n, 0.5, 0.5, n, n, n, n, n],
        note=[f"carried-{i}" for i in range(12)],
    )
    out = tmp_path / "out"
    rc, err = run(table, out, tiny_safetensors, capsys=capsys)
    assert rc == 1, err  # some rows failed
    assert "images/s" in err and "ETA" in err and "done: 7, errored: 6, remaining: 0" in err

    m = read_parts(out / "manifest")
    assert sorted(m["id"]) == sorted(["a", "b-0", "b-1", "../evil", "x/y\\z", "..", "img"])
    assert sorted(pd.read_parquet(out / "manifest")["id"]) == sorted(m["id"])  # pandas reads the folder
    model_hash = sha256(tiny_safetensors)
    for col in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "width", "height",
                "image", "sha256", "model_hash", "seconds", "worker", "note"):
        assert col in m.columns
    rows = m.set_index("id")
    assert rows.loc["b-0", "seed"] == 1234 and rows.loc["b-1", "seed"] == 1235
    assert rows.loc["a", "seed"] == planning.derive_seed(0, "a")
    assert rows.loc["b-1", "negative_prompt"] == "blurry" and rows.loc["b-1", "note"] == "carried-1"
    assert rows.loc["img", "init_image"] == str(init) and rows.loc["img", "strength"] == 0.5
    assert (m["model_hash"] == model_hash).all() and (m["steps"] == 2).all()
    images = out / "images"
    for image_id, r in rows.iterrows():
        path = Path(r["image"])
        assert path.parent == images  # unsafe ids too
        assert sha256(path) == r["sha256"]
        assert r["seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png", "not-an-image.png", "out", "prompts.parquet"]
    params = Image.open(rows.loc["b-1", "image"]).text["parameters"]
    assert params == (f"a blue ball\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7.5, "
                      f"Seed: 1235, Size: 64x64, Model hash: {model_hash[:10]}")
    assert "Denoising strength: 0.5" in Image.open(rows.loc["img", "image"]).text["parameters"]

    e = read_parts(out / "errors").set_index("row")
    assert sorted(e.index) == [6, 7, 8, 9, 10, 11]
    assert e.loc[6, "error"].startswith("Row 6 (id ") and "not-an-image.png" in e.loc[6, "error"]
    assert "could not be read" in e.loc[6, "error"]
    assert "prompt is empty" in e.loc[7, "error"] and e.loc[7, "note"] == "carried-7"
    assert "multiple of 8" in e.loc[8, "error"]
    assert "steps 0" in e.loc[9, "error"]
    assert "sampler 'nope'" in e.loc[10, "error"]
    assert "already used by row 0" in e.loc[11, "error"] and e.loc[11, "prompt"] == "dup"

    run_json = json.loads((out / "run.json").read_text())
    assert run_json["model_hash"] == model_hash and run_json["settings"]["steps"] == 2
    assert run_json["versions"]["ray"] and run_json["rows"] == 13

    assert jobs_cli.main(["status", str(out)]) == 0
    assert "done: 7\nerrored: 6\nremaining: 0" in capsys.readouterr().out

    # the same command again: nothing to do, nothing written twice
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"}
    rc, err = run(table, out, tiny_safetensors, capsys=capsys)
    assert rc == 1 and "0 to generate" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"} == before

    # other generation settings into the same OUT are refused
    rc = jobs_cli.main(["run", str(table), "--model", str(tiny_safetensors), "--output", str(out),
                    *FAST[:1], "3", *FAST[2:]])
    assert rc == 2 and "steps 2 -> 3" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"} == before


# ----------------------------------------------------------------------------- never lose, never duplicate

SIX = dict(prompt=[f"prompt {i}" for i in range(12)], note=list("abcdefghijkl"))  # 6 batches


@pytest.fixture(scope="module")
def reference(ray_head, tiny_safetensors, tmp_path_factory):
    """Twelve images generated in one uninterrupted run: the sha256 of each id."""
    tmp = tmp_path_factory.mktemp("reference")
    table = write_table(tmp / "six.parquet", **SIX)
    assert run(table, tmp / "out", tiny_safetensors)[0] == 0
    m = read_parts(tmp / "out" / "manifest")
    return table, tmp / "out", dict(zip(m["id"], m["sha256"]))


def assert_each_id_once(out: Path, ids):
    m = read_parts(out / "manifest")
    assert sorted(m["id"]) == sorted(ids)  # each exactly once
    assert read_parts(out / "errors") is None
    return dict(zip(m["id"], m["sha256"]))


def test_unrecorded_images_are_regenerated_byte_identically(reference, tiny_safetensors, tmp_path, capsys):
    table, ref_out, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    # "written but not recorded": drop one id from the manifest; its batch mate stays recorded
    parts = sorted((out / "manifest").glob("*.parquet"))
    whole = pa.concat_tables([pq.read_table(p, use_threads=False) for p in parts])
    for p in parts:
        p.unlink()
    dropped = sorted(ref)[3]
    kept = whole.filter(pa.compute.not_equal(whole["id"], dropped))
    pq.write_table(kept, out / "manifest" / "part-edited.parquet")
    image = out / "images" / f"{dropped}.png"
    image.write_bytes(b"truncated")  # a half-written image is replaced too
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir() if p != image}

    rc, err = run(table, out, tiny_safetensors, capsys=capsys)
    assert rc == 0, err
    assert "1 to generate" in err
    assert assert_each_id_once(out, ref) == ref
    assert sha256(image) == ref[dropped]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir() if p != image} == before


def test_driver_killed_then_rerun_records_every_row_once(reference, ray_head, tiny_safetensors, tmp_path):
    table, _, ref = reference
    out = tmp_path / "out"
    proc = cli("run", table, "--model", tiny_safetensors, "--output", out, *FAST, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 240
        while not list((out / "manifest").glob("*.parquet")):  # the first batch is recorded
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    recorded = read_parts(out / "manifest")
    assert 0 < len(recorded) < 12  # killed mid-job
    before = {i: Path(p).stat().st_mtime_ns for i, p in zip(recorded["id"], recorded["image"])}

    assert run(table, out, tiny_safetensors)[0] == 0
    assert assert_each_id_once(out, ref) == ref  # all, once, byte-identical to an uninterrupted run
    assert {i: Path(p).stat().st_mtime_ns for i, p in zip(recorded["id"], recorded["image"])} == before


def test_actor_killed_mid_batch_still_records_every_row_once(ray_head, tiny_safetensors, tmp_path):
    from ray.util.state import list_actors

    table = write_table(tmp_path / "t.parquet", prompt=[f"p{i}" for i in range(8)])
    out = tmp_path / "out"
    proc = cli("run", table, "--model", tiny_safetensors, "--output", out, *FAST, env=dict(os.environ))
    try:
        deadline, pid = time.monotonic() + 240, None
        while pid is None:  # the generation actor, as soon as it is up (and so at work)
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")], address=ray_head.dashboard)
                     if "GenerationActor" in a.class_name]
            pid = alive[0].pid if alive else None
        images_at_kill = len(list((out / "images").glob("*.png")))
        os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert images_at_kill < 8
    assert proc.returncode == 0, output
    assert_each_id_once(out, [f"{i:08d}" for i in range(8)])
    workers = set(read_parts(out / "manifest")["worker"])
    assert any(not w.endswith(f":{pid}") for w in workers)  # a restarted actor did the rest


def test_other_settings_or_weights_refused_unless_overwrite(ray_head, tiny_safetensors, tmp_path, capsys):
    out = tmp_path / "out"
    model = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_safetensors, model)
    small = write_table(tmp_path / "two.parquet", prompt=SIX["prompt"][:2])
    assert run(small, out, model)[0] == 0

    # the same path now holds other weights: refused before anything is recorded
    from sdbatch.model.weights import save_random_checkpoint

    save_random_checkpoint(model, seed=1)
    more = write_table(tmp_path / "three.parquet", prompt=SIX["prompt"][:3])
    capsys.readouterr()
    rc, err = run(more, out, model, capsys=capsys)
    assert rc == 2 and "other generation settings (model " in err  # the model is its sha256
    assert sorted(read_parts(out / "manifest")["id"]) == ["00000000", "00000001"]
    capsys.readouterr()
    rc, err = run(small, out, model, "--seed", "5", capsys=capsys)
    assert rc == 2 and "seed 0 -> 5" in err and "--overwrite" in err
    rc, err = run(small, out, model, "--seed", "5", "--overwrite", capsys=capsys)
    assert rc == 0, err
    m = read_parts(out / "manifest")
    assert sorted(m["seed"]) == sorted(planning.derive_seed(5, i) for i in m["id"])
    assert sorted(m["id"]) == ["00000000", "00000001"]
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 5


# ----------------------------------------------------------------------------- S3 and ray job submit


def test_table_model_and_outputs_on_s3(ray_head, tiny_safetensors, tmp_path, capsys):
    import ray
    import s3fs

    fs = s3fs.S3FileSystem()  # AWS_ENDPOINT_URL points at the moto server
    fs.mkdir("jobs")
    write_table(tmp_path / "t.parquet", prompt=["a", "b", "c"], tag=["x", "y", "z"])
    fs.put_file(str(tmp_path / "t.parquet"), "jobs/prompts/part-0.parquet")
    fs.put_file(str(tiny_safetensors), "jobs/models/tiny.safetensors")

    args = ["s3://jobs/prompts/", "s3://jobs/out", "s3://jobs/models/tiny.safetensors"]
    assert run(args[0], args[1], args[2])[0] == 0
    # (pyarrow 26 may abort at exit after threaded reads from Python file objects: no threads)
    m = pa.concat_tables([pq.read_table(fs.open(p), use_threads=False)
                          for p in fs.glob("jobs/out/manifest/*.parquet")]).to_pandas()
    assert sorted(m["id"]) == ["00000000", "00000001", "00000002"] and sorted(m["tag"]) == ["x", "y", "z"]
    for uri, digest in zip(m["image"], m["sha256"]):
        assert uri.startswith("s3://jobs/out/images/")
        assert hashlib.sha256(fs.cat_file(uri)).hexdigest() == digest
    assert (m["model_hash"] == sha256(tiny_safetensors)).all()
    assert ray.data.read_parquet("jobs/out/manifest", filesystem=fs).count() == 3
    assert json.loads(fs.cat_file("jobs/out/run.json"))["settings"]["model"] == args[2]
    # the model was copied once into the node's cache, not read from S3 per actor
    assert len(list(Path(ray_head.env["SDBATCH_CACHE"]).rglob("tiny.safetensors"))) == 1

    capsys.readouterr()
    assert jobs_cli.main(["status", args[1]]) == 0
    assert "done: 3\nerrored: 0\nremaining: 0" in capsys.readouterr().out
    rc, err = run(args[0], args[1], args[2], capsys=capsys)
    assert rc == 0 and "0 to generate" in err


def test_ray_job_submit_with_token_auth(ray_head, tiny_safetensors, tmp_path):
    table = write_table(tmp_path / "t.parquet", prompt=["a", "b", "c"])
    out = tmp_path / "out"
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard,
              "--working-dir", str(REPO), "--", "python", "-m", "sdbatch.jobs", "run", str(table),
              "--model", str(tiny_safetensors), "--output", str(out), *FAST]

    # without the cluster's token the submission is refused
    no_token = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    (tmp_path / "home").mkdir()
    refused = subprocess.run(submit, env=dict(no_token, HOME=str(tmp_path / "home")),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()

    done = subprocess.run(submit, env=ray_head.env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "images/s" in done.stdout + done.stderr
    assert_each_id_once(out, ["00000000", "00000001", "00000002"])


def test_cpu_actor_pool_never_oversubscribes_cores(ray_head):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])  # 2 on the test head
    for workers in (None, "1", "2", "5", "auto"):
        pool = common.actor_pool(workers, None)
        assert pool.num_gpus == 0 and pool.threads == pool.num_cpus  # Ray reserves what torch uses
        assert (pool.max_size or 1) * pool.threads <= cpus
    assert common.actor_pool(None, None).threads == cpus  # one actor gets every core
    assert common.actor_pool("2", None).max_size == 2
    with pytest.raises(JobError, match="no GPUs"):
        common.actor_pool(None, 1.0)


class FlakyS3Proxy:
    """A TCP proxy in front of the S3 endpoint whose first `failures` connections are answered
    `503 SlowDown` (a throttling S3 returns exactly that), the rest passed through."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, target: str, failures: int):
        import socket
        import threading

        self.target = target.rsplit(":", 1)
        self.failures, self.failed = failures, 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        import socket
        import threading

        with self.lock:
            fail = self.failed < self.failures
            self.failed += fail
        if fail:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))
            conn.close()
            return
        upstream = socket.create_connection((self.target[0].split("//")[1], int(self.target[1])))

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)

    def close(self):
        self.sock.close()


def test_transient_storage_errors_are_retried(ray_head, s3_endpoint, tiny_safetensors, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("flaky")
    write_table(tmp_path / "t.parquet", prompt=["a", "b"])
    fs.put_file(str(tmp_path / "t.parquet"), "flaky/prompts.parquet")
    proxy = FlakyS3Proxy(s3_endpoint, failures=6)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the driver and (passed on) its actors
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        rc, err = run("s3://flaky/prompts.parquet", "s3://flaky/out", tiny_safetensors)
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.failed == 6  # the faults happened...
    assert rc == 0            # ...and the job got through them
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    ids = pa.concat_tables([pq.read_table(fs.open(p), use_threads=False) for p in fs.glob("flaky/out/manifest/*.parquet")])["id"]
    assert sorted(ids.to_pylist()) == ["00000000", "00000001"]
