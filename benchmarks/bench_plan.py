"""Planning big prompt tables (issue 11): `jobs plan` on 1M- and 10M-row tables (ids and prompts),
its wall time, CPU time and the driver's peak RSS, `jobs status`, the resumed plan with half
the ids recorded, and the recorder's rows per second on one core; beside them, at 1M rows, the
loop the columnar plan replaced (tests/plan_reference.py), as a ratio.

    .venv/bin/python benchmarks/bench_plan.py [--rows 1000000 10000000] [--no-reference]

Each command runs in a subprocess, measured by os.wait4 (wall, user+sys CPU, peak RSS); the
benchmark holds /tmp/sdbatch-bench.lock throughout. Tables are made in a temporary folder
(about 0.3 GB at 10M rows). The model is the built-in one (hashed once per command, as `run`
does); no image is generated.
"""

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str]) -> dict:
    """Runs cmd (one torch/OpenMP thread); returns wall s, CPU s (user + sys of the process and
    its children), peak RSS MB (os.wait4's ru_maxrss) and stdout. Raises on a non-zero exit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} exited {proc.returncode}: {err.read()[-2000:]}")
        return dict(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, rss_mb=usage.ru_maxrss / 1024,
                    stdout=out.read())


def make_table(path: Path, n: int) -> None:
    """ids `img-000000000`... and prompts of about 40 characters, in row groups of 1M rows."""
    writer = None
    for lo in range(0, n, 1_000_000):
        i = pa.array(np.arange(lo, min(n, lo + 1_000_000)))
        digits = pc.cast(i, pa.string())
        table = pa.table({
            "id": pc.binary_join_element_wise("img-", pc.utf8_lpad(digits, 9, "0"), ""),
            "prompt": pc.binary_join_element_wise("a photo of object ", pc.cast(pc.bit_wise_and(i, 1023), pa.string()),
                                                  ", in the style number ", digits, ""),
        })
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def record_done(out: Path, table: Path, fraction: float) -> int:
    """OUT/manifest: the first `fraction` of the table's ids recorded (files of 1M rows, as after
    compaction). Returns the number of rows."""
    ids = pq.read_table(table, columns=["id"]).column("id")
    k = int(len(ids) * fraction)
    (out / "manifest").mkdir(parents=True, exist_ok=True)
    for lo in range(0, k, 1_000_000):
        part = ids.slice(lo, min(k, lo + 1_000_000) - lo)
        pq.write_table(pa.table({"id": part, "seed": pa.array(np.arange(len(part)))}),
                       out / "manifest" / f"compacted-{lo // 1_000_000:04d}.parquet")
    return k


RECORDER = r"""
import os, sys, tempfile, time
import numpy as np, pyarrow as pa
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
pa.set_cpu_count(1); pa.set_io_thread_count(1)
from sdbatch.actors import result_schema
from sdbatch.jobs.output import Output
from sdbatch.jobs.record import Recorder
block = 64
n = int(sys.argv[1]) // block * block
out = Output(tempfile.mkdtemp(prefix="bench-recorder-"))
source = pa.table({"id": [f"img-{i:09d}" for i in range(n)], "prompt": ["a photo"] * n})
def results(lo):
    k = np.arange(lo, lo + block)
    ids = pa.array([f"img-{i:09d}" for i in k])
    cols = dict(id=ids, prompt=pa.array(["a photo of object"] * block), negative_prompt=pa.array([""] * block),
                seed=pa.array(k), steps=pa.array([25] * block), cfg_scale=pa.array([7.5] * block),
                sampler=pa.array(["dpmpp_2m_karras"] * block), width=pa.array([512] * block),
                height=pa.array([512] * block), init_image=pa.nulls(block, pa.string()),
                strength=pa.array([0.8] * block), row=pa.array(k), plan_index=pa.array(k),
                carried=pa.StructArray.from_arrays([pa.array(["cat"] * block)], names=["category"]))
    res = dict(image=pa.array([f"file:///out/images/{i}.png" for i in k]), latent=pa.array([f"file:///x/{i}.npy" for i in k]),
               sha256=pa.array(["0" * 64] * block), model_hash=pa.array(["ab" * 32] * block),
               seconds=pa.array([0.5] * block), worker=pa.array(["host:1"] * block), nsfw=pa.array([False] * block),
               watermark=pa.array([True] * block), c2pa=pa.array([False] * block), error=pa.nulls(block, pa.string()))
    return pa.table({**cols, **{k: v.cast(result_schema().field(k).type) for k, v in res.items()}})
blocks = [results(lo) for lo in range(0, n, block)]
recorder = Recorder(out, source, n)
start = time.process_time(); wall = time.perf_counter()
for b in blocks:
    recorder.add(b)
recorder.flush()
print(n / (time.process_time() - start), n / (time.perf_counter() - wall))
"""

OLD_PLAN = r"""
import sys
sys.path.insert(0, "tests")
import plan_reference as reference
from sdbatch.jobs.plan import DEFAULTS, read_table
table = read_table(sys.argv[1])
plan = reference.make_plan(table, dict(DEFAULTS, width=64, height=64))
work, errors = reference.work(plan, 4, set())
print(len(work))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--no-reference", action="store_true", help="skip the old loop at 1M rows")
    parser.add_argument("--recorder-rows", type=int, default=100_000)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    jobs = [sys.executable, "-m", "sdbatch.jobs"]
    results = []
    with open("/tmp/sdbatch-bench.lock", "w") as lock, tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load = os.getloadavg()[0]
        # the command's own cost (imports, the model's check, which imports torch) on a 6-row table
        base = run_measured([*jobs, "plan", str(ROOT / "jobs/example_prompts.parquet"), "--output", str(Path(tmp) / "o")])
        for n in args.rows:
            table, out = Path(tmp) / f"t{n}.parquet", Path(tmp) / f"out{n}"
            make_table(table, n)
            fresh = run_measured([*jobs, "plan", str(table), "--output", str(out)])
            row = dict(rows=n, plan_s=fresh["wall_s"], plan_cpu_s=fresh["cpu_s"], plan_rss_mb=fresh["rss_mb"])
            if n == 1_000_000 and not args.no_reference:
                old = run_measured([sys.executable, "-c", OLD_PLAN, str(table)])
                row.update(old_plan_s=old["wall_s"], old_plan_cpu_s=old["cpu_s"], old_plan_rss_mb=old["rss_mb"])
            record_done(out, table, 0.5)
            resumed = run_measured([*jobs, "plan", str(table), "--output", str(out)])
            assert f"{n // 2} already done" in resumed["stdout"], resumed["stdout"]
            (out / "run.json").write_text(json.dumps({"settings": {}, "rows": n}))
            status = run_measured([*jobs, "status", str(out)])
            row.update(resume_s=resumed["wall_s"], resume_cpu_s=resumed["cpu_s"], resume_rss_mb=resumed["rss_mb"],
                       status_s=status["wall_s"], status_rss_mb=status["rss_mb"])
            results.append(row)
            print(json.dumps(row), flush=True)
        rec = run_measured([sys.executable, "-c", RECORDER, str(args.recorder_rows)])
        rec_cpu, rec_wall = map(float, rec["stdout"].split())
    print(f"\nCPU: {cpu}; load average {load:.1f} when started (2 cores shared with other work)")
    print(f"baseline: jobs plan of a 6-row table: {base['wall_s']:.1f} s, {base['cpu_s']:.1f} CPU s, "
          f"{base['rss_mb']:.0f} MB peak RSS")
    print(f"{'rows':>10} {'plan s':>8} {'(CPU s)':>8} {'RSS MB':>8} {'resume s':>9} {'(CPU s)':>8} {'RSS MB':>8} "
          f"{'status s':>9} {'old plan s':>10} {'old RSS MB':>10}")
    for r in results:
        print(f"{r['rows']:>10} {r['plan_s']:>8.1f} {r['plan_cpu_s']:>8.1f} {r['plan_rss_mb']:>8.0f} "
              f"{r['resume_s']:>9.1f} {r['resume_cpu_s']:>8.1f} {r['resume_rss_mb']:>8.0f} {r['status_s']:>9.1f} "
              f"{r.get('old_plan_s', float('nan')):>10.1f} {r.get('old_plan_rss_mb', float('nan')):>10.0f}")
    print(f"recorder: {rec_cpu:,.0f} result rows per CPU second on one core ({rec_wall:,.0f} per wall second), "
          f"{args.recorder_rows} rows in blocks of 64")


if __name__ == "__main__":
    main()
