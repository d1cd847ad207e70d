"""Compaction of a job's manifest and errors (sdbatch/jobs/compact.py): a real SIGKILL after
every step of it, locally and on S3 (moto), must leave every reader (Output.read, id_column,
count, flagged, `status`, the metrics job's image list) with exactly the recorded rows, and the
next compaction must finish the job; readers listing while compactions run see no loss and no
duplicate; `status` and a resumed `jobs run` after a killed compaction."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import set_env
from ray_fixtures import ray_head  # noqa: F401  (fixture)
from sdbatch.jobs import cli as jobs_cli, compact
from sdbatch.jobs.output import Output, counts

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "euler", "--batch-size", "2",
        "--workers", "1"]

# Runs the compaction of OUT (manifest, then errors) in this process and SIGKILLs it after
# step k (k = 0: runs to the end and prints the number of steps). max_rows makes the manifest
# two merges.
KILL_AFTER = """
import os, signal, sys
from sdbatch.jobs import compact
from sdbatch.jobs.output import Output

out, k = Output(sys.argv[1]), int(sys.argv[2])
compact.MAX_ROWS = int(sys.argv[3])
n = 0
for folder in compact.FOLDERS:
    for step in compact.compaction_steps(out, folder, final=True):
        n += 1
        if n == k:
            os.kill(os.getpid(), signal.SIGKILL)
print(n)
"""


def kill_after(uri: str, k: int, max_rows: int = 10) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILL_AFTER, uri, str(k), str(max_rows)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def make_out(uri: str) -> dict:
    """An OUT as recorders leave it: 4 manifest parts of 5 rows (two without the nsfw column, two
    carrying a table column) and 2 error parts; returns the expected rows of each folder."""
    out = Output(uri)
    manifest = []
    for p in range(4):
        rows = [dict(id=f"m{p}{i}", prompt=f"prompt {p}{i}", image=f"/imgs/m{p}{i}.png", seed=10 * p + i)
                for i in range(5)]
        if p % 2:
            for r in rows:
                r["nsfw"] = r["id"] in ("m13", "m30", "m31")
        else:
            for r in rows:
                r["note"] = f"note {r['id']}"
        manifest += rows
        out.write_part("manifest", pa.Table.from_pylist(rows))
    errors = []
    for p in range(2):
        rows = [dict(id=f"e{p}{i}", error=f"Row {i}: bad", row=i) for i in range(3)]
        errors += rows
        out.write_part("errors", pa.Table.from_pylist(rows))
    out.write_run(dict(rows=len(manifest) + len(errors) + 7))
    return dict(manifest=manifest, errors=errors)


def normal(rows: list[dict]) -> list[dict]:
    """Rows sorted by id, without null fields (a column a part lacked reads as null)."""
    return sorted(({k: v for k, v in r.items() if v is not None} for r in rows), key=lambda r: r["id"])


def check_readers(uri: str, expected: dict, capsys) -> None:
    from sdbatch.jobs import metrics as jobs_metrics

    out = Output(uri)
    for folder, rows in expected.items():
        assert normal(out.read(folder).to_pylist()) == normal(rows), folder
        ids = out.id_column(folder)
        assert sorted(ids.to_pylist()) == sorted(r["id"] for r in rows)  # each once
        assert out.count(folder) == len(rows)
    assert counts(out) == (20, 6)
    assert counts(out, {"m00", "m31", "e11", "nope"}) == (2, 1)
    assert out.flagged() == {"m13", "m30", "m31"}
    capsys.readouterr()
    assert jobs_cli.main(["status", uri]) == 0
    assert capsys.readouterr().out == "done: 20\nerrored: 6\nremaining: 7\n"
    assert jobs_metrics.open_source(uri).uris == sorted(r["image"] for r in expected["manifest"])


def check_compacted(folder: Path) -> None:
    """Nothing left over: one Parquet file, the journal done, no temporary file."""
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0] == compact.JOURNAL and names[1].startswith("compacted-"), names
    assert json.loads((folder / compact.JOURNAL).read_text())["state"] == "done"


def test_kill_after_every_step_loses_and_duplicates_nothing(tmp_path, capsys):
    fresh = tmp_path / "fresh"
    expected = make_out(str(fresh))
    whole = tmp_path / "whole"
    shutil.copytree(fresh, whole)
    proc = kill_after(str(whole), 0)
    steps = int(proc.communicate(timeout=120)[0].strip().splitlines()[-1])
    assert steps == 18  # manifest: 2 merges x (journal, file, journal, 2 deletes, journal); errors: 1
    check_readers(str(whole), expected, capsys)
    assert len(list((whole / "manifest").glob("*.parquet"))) == 2

    procs = {}
    for k in range(1, steps + 1):
        shutil.copytree(fresh, tmp_path / f"k{k}")
        if k > 6:  # at most 6 processes at once
            procs[k - 6].wait(120)
        procs[k] = kill_after(str(tmp_path / f"k{k}"), k)
    for k, proc in procs.items():
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == -signal.SIGKILL, output
        uri = str(tmp_path / f"k{k}")
        check_readers(uri, expected, capsys)
        compact.compact(Output(uri))  # the next compaction finishes or abandons the killed one
        check_readers(uri, expected, capsys)
        for folder in ("manifest", "errors"):
            check_compacted(tmp_path / f"k{k}" / folder)


def test_kill_during_recovery(tmp_path, capsys):
    uri = str(tmp_path / "out")
    expected = make_out(uri)
    proc = kill_after(uri, 4)  # manifest: journal, merged file, journal, one input deleted
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    proc = kill_after(uri, 1)  # and killed again after deleting the other input
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    check_readers(uri, expected, capsys)
    compact.compact(Output(uri))
    check_readers(uri, expected, capsys)
    check_compacted(tmp_path / "out" / "manifest")


def test_abandoned_compaction_leaves_no_temporary_file(tmp_path, capsys):
    uri = str(tmp_path / "out")
    expected = make_out(uri)
    proc = kill_after(uri, 1)  # the journal names a merged file that was never written
    proc.communicate(timeout=120)
    journal = json.loads((tmp_path / "out" / "manifest" / compact.JOURNAL).read_text())
    (tmp_path / "out" / "manifest" / (journal["output"] + ".tmp-1-deadbeef")).write_bytes(b"PAR1 half")
    check_readers(uri, expected, capsys)
    compact.compact(Output(uri))
    check_readers(uri, expected, capsys)
    check_compacted(tmp_path / "out" / "manifest")


def test_kill_on_s3(s3_endpoint, capsys):
    import s3fs

    with set_env(AWS_ENDPOINT_URL=s3_endpoint):
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("compaction")
        expected = make_out("s3://compaction/fresh")
        for k in (4,):  # the merged file in place, one of its inputs deleted
            uri = f"s3://compaction/k{k}"
            fs.copy("compaction/fresh", f"compaction/k{k}", recursive=True)
            proc = kill_after(uri, k)
            output = proc.communicate(timeout=120)[0]
            assert proc.returncode == -signal.SIGKILL, output
            names = [p.rsplit("/", 1)[1] for p in fs.ls(f"compaction/k{k}/manifest", refresh=True)]
            assert sum(n.startswith("compacted-") for n in names) == 1
            assert sum(n.startswith("part-") for n in names) == 3
            check_readers(uri, expected, capsys)
            compact.compact(Output(uri))
            check_readers(uri, expected, capsys)
            names = [p.rsplit("/", 1)[1] for p in fs.ls(f"compaction/k{k}/manifest", refresh=True)]
            assert sorted(n.split("-")[0] for n in names) == [compact.JOURNAL, "compacted"]


def test_readers_during_compactions_see_each_row_once(tmp_path):
    """A reader listing while another process merges and deletes files (40 parts, merged two by
    two: 20 compactions) sees every row exactly once, every time."""
    uri = str(tmp_path / "out")
    out = Output(uri)
    for p in range(40):
        out.write_part("manifest", pa.table({"id": [f"{p:02d}-{i}" for i in range(5)]}))
    script = KILL_AFTER.replace("compact.MAX_ROWS", "compact.SMALL_ROWS = compact.MAX_ROWS")
    proc = subprocess.Popen([sys.executable, "-c", script, uri, "0", "10"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reads = 0
    while proc.poll() is None:
        ids = out.id_column("manifest")
        assert len(ids) == 200 and len(pc.unique(ids)) == 200
        assert out.count("manifest") == 200
        reads += 1
    assert proc.returncode == 0, proc.stdout.read()
    assert int(proc.stdout.read().split()[-1]) == 20 * 6
    assert reads >= 3  # the reads did overlap the compactions
    assert len(list((tmp_path / "out" / "manifest").glob("*.parquet"))) == 20


def test_background_compaction_while_recording(tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "SMALL_ROWS", 20)
    out = Output(str(tmp_path / "out"))
    compactor = compact.Compactor(out)
    for p in range(30):
        out.write_part("manifest", pa.table({"id": [f"{p:02d}-{i}" for i in range(3)]}))
        compactor.wrote("manifest", 3)
    compactor.thread.join()
    files = list((tmp_path / "out" / "manifest").glob("*.parquet"))
    assert any(f.name.startswith("compacted-") for f in files) and len(files) < 30
    compact.compact_at_end(out)
    files = list((tmp_path / "out" / "manifest").glob("*.parquet"))
    assert sorted(out.ids("manifest")) == sorted(f"{p:02d}-{i}" for p in range(30) for i in range(3))
    assert sum(pq.read_metadata(f).num_rows < 20 for f in files) <= 1  # small files merged


def test_status_and_resume_after_a_killed_compaction(ray_head, tiny_safetensors, tmp_path, capsys):
    prompts = [f"prompt {i}" for i in range(6)] + [""]  # the empty prompt is a row error
    pq.write_table(pa.table({"prompt": prompts[:4] + prompts[6:]}), tmp_path / "first.parquet")
    pq.write_table(pa.table({"prompt": prompts[:4] + prompts[6:] + prompts[4:6]}), tmp_path / "all.parquet")
    out_dir = tmp_path / "out"
    uri = str(out_dir)
    run = ["run", "--model", str(tiny_safetensors), "--output", uri, *FAST]
    assert jobs_cli.main([*run[:1], str(tmp_path / "first.parquet"), *run[1:]]) == 1  # one row error
    assert len(list((out_dir / "manifest").glob("*.parquet"))) == 1  # compacted at the end

    # the manifest as parts again, as a recorder writes them, then a compaction killed mid-way
    out = Output(uri)
    table = out.read("manifest")
    for f in (out_dir / "manifest").glob("*.parquet"):
        f.unlink()
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        out.write_part("manifest", table.slice(rows.start, rows.stop - rows.start))
    proc = kill_after(uri, 4, max_rows=100)  # merged file in place, one input deleted
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(list((out_dir / "manifest").glob("*.parquet"))) == 3  # the merged file and two inputs
    capsys.readouterr()
    assert jobs_cli.main(["status", uri]) == 0
    assert capsys.readouterr().out == "done: 4\nerrored: 1\nremaining: 0\n"
    made = {i: os.stat(p).st_mtime_ns for i, p in zip(table["id"].to_pylist(), table["image"].to_pylist())}

    assert jobs_cli.main([*run[:1], str(tmp_path / "all.parquet"), *run[1:]]) == 1
    m = out.read("manifest")
    assert sorted(m["id"].to_pylist()) == [f"{i:08d}" for i in (0, 1, 2, 3, 5, 6)]  # row 4 is the error
    assert {i: os.stat(p).st_mtime_ns for i, p in zip(table["id"].to_pylist(), table["image"].to_pylist())} == made
    check_compacted(out_dir / "manifest")
    capsys.readouterr()
    assert jobs_cli.main(["status", uri]) == 0
    assert capsys.readouterr().out == "done: 6\nerrored: 1\nremaining: 0\n"
