"""The columnar plan (sdbatch.jobs.plan) against the loop it replaced (tests/plan_reference.py):
the same ids, seeds, image settings, batches, row errors (messages, order) and skips, on the
repository's tables and on mixed tables; and `jobs plan`, which prints a plan and starts nothing."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import plan_reference as reference
from sdbatch.blocklist import Blocklist
from sdbatch.jobs import cli, plan as planning

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny random-weight checkpoint: `jobs plan` checks its --model as `run` does."""
    from sdbatch.model.weights import save_random_checkpoint

    return str(save_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors"))
SETTINGS = dict(planning.DEFAULTS, steps=2, width=64, height=64)


def assert_same_plan(table, settings=SETTINGS, batch_size=3, blocklist=None, recorded=()):
    """Plans `table` both ways and compares everything the job uses; returns the new plan."""
    old = reference.make_plan(table, settings)
    if blocklist is not None:
        reference.block_prompts(old, blocklist)
    new = planning.make_plan(table, settings, blocklist)
    assert new.errors.to_pylist() == old.errors
    assert new.columns(np.arange(new.images.num_rows)).to_pylist() == old.rows
    assert new.total == len(old.rows) + len(old.errors)
    old_work, old_new_errors = reference.work(old, batch_size, set(recorded))
    work = planning.select_work(new, planning.make_batches(new, batch_size), pa.array(list(recorded), pa.string()))
    rows = [dict(r, skip=bool(s)) for r, s in zip(new.columns(work.order).to_pylist(), work.skip)]
    assert [rows[a:b] for a, b in zip(work.starts[:-1], work.starts[1:])] == old_work
    assert sum(not r["skip"] for r in rows) == sum(not r["skip"] for b in old_work for r in b)
    assert old_new_errors == [e for e in new.errors.to_pylist() if e["id"] not in set(recorded)]
    return new


@pytest.mark.parametrize("path", ["jobs/example_prompts.parquet", "jobs/shapes/prompts.parquet",
                                  "jobs/coco30k/sample.parquet"])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_the_repository_tables_plan_as_before(path, batch_size):
    table = planning.read_table(str(ROOT / path))
    plan = assert_same_plan(table, batch_size=batch_size)
    assert plan.images.num_rows > 0
    ids = plan.images.column("id").to_pylist()  # half of it done: skips and kept batches still agree
    assert_same_plan(table, batch_size=batch_size, recorded=ids[::2])


def mixed_table(n=600, seed=0):
    """Several shapes and samplers, num_images, seeds near the limit, init images, null and empty
    prompts, bad values, and string ids that collide with `<id>-j` and with each other."""
    rng = np.random.default_rng(seed)

    def pick(good, bad):  # one row in 40 has each column's bad values
        return [bad[rng.integers(len(bad))] if rng.random() < 1 / 40 else good[rng.integers(len(good))]
                for _ in range(n)]

    ids = [f"r{i % 450}" if i % 97 else f"r{i % 7}-0" for i in range(n)]
    return pa.table({
        "id": ids,
        "prompt": pick(["a cat", "a dog", "a red car", "blocked word here"], ["", "  \u3000", None, "\x1c"]),
        "negative_prompt": pick([None, "", "blurry", "ugly blocked"], [None]),
        "num_images": pa.array(pick([None, None, None, 1, 2, 3], [0, -1, 200_000]), pa.int64()),
        "seed": pa.array(pick([None, None, 7], [2**63 - 2, 2**63 - 1, -5]), pa.int64()),
        "width": pa.array(pick([None, 64, 128], [60, 0, 32_768]), pa.int32()),
        "height": pa.array(pick([None, 64, 96], [None]), pa.int64()),
        "steps": pa.array(pick([None, 1, 3], [0, 2000]), pa.int16()),
        "cfg_scale": pick([None, 7.5, 5.0, -0.0, 0.0], [float("nan"), float("inf")]),
        "sampler": pick([None, "ddim", "euler"], ["nope"]),
        "init_image": pick([None, None, None, "x.png", ""], [None]),
        "strength": pick([None, 0.5, 1.0], [1.5, 0.0, 0.2]),
        "note": [f"carried {i}" for i in range(n)],
    })


def test_a_mixed_table_plans_as_before():
    table = mixed_table()
    plan = assert_same_plan(table, batch_size=3)
    # the table exercises what it should: every kind of error, duplicates and several shapes
    messages = " ".join(plan.errors.column("error").to_pylist())
    for what in ("prompt is null", "prompt is empty", "not a positive multiple of 8", "larger than 16384",
                 "outside [1, 1000]", "is unknown", "not a finite number", "outside (0, 1]", "less than 1",
                 "more than 100000", "outside [0, 2^63)", "past 2^63 - 1", "is already used by row"):
        assert what in messages, what
    assert len(plan.shapes) >= 6
    assert plan.images.num_rows > 100
    blocklist = Blocklist.parse("blocked\n")
    blocked = assert_same_plan(table, batch_size=2, blocklist=blocklist)
    assert "matches blocklist rule" in " ".join(blocked.errors.column("error").to_pylist())
    done = plan.images.column("id").to_pylist()[5::3] + plan.errors.column("id").to_pylist()[::2]
    assert_same_plan(table, batch_size=4, blocklist=blocklist, recorded=done + ["not-in-the-table"])


def test_integer_ids_dictionary_columns_and_other_tables_plan_as_before():
    n = 300
    ids = pa.array([i // 3 if i % 5 else None for i in range(n)], pa.int64())  # repeats and null ids
    table = pa.table({"id": ids, "prompt": pa.array([f"p{i % 11}" for i in range(n)]).dictionary_encode(),
                      "num_images": pa.array([None if i % 4 else 2 for i in range(n)], pa.uint8()),
                      "sampler": pa.array([["ddim", "euler", None][i % 3] for i in range(n)]).dictionary_encode()})
    assert_same_plan(table, batch_size=5)
    assert_same_plan(pa.table({"prompt": ["a", "b"] * 40}), settings=dict(SETTINGS, seed=12345), batch_size=8)
    assert_same_plan(pa.table({"prompt": pa.array([None, None], pa.string())}))
    assert_same_plan(pa.table({"prompt": pa.array([], pa.string())}))
    # integers past int64 (uint64) are reported with their own value
    big = pa.table({"prompt": ["a", "b", "c"], "seed": pa.array([2**64 - 1, 5, 2**63], pa.uint64()),
                    "width": pa.array([64, 2**63 + 64, 64], pa.uint64())})
    assert_same_plan(big)


def test_appended_rows_join_only_the_last_batch_of_their_shape():
    table = mixed_table(400, seed=3)
    before = planning.make_plan(table.slice(0, 300), SETTINGS)
    after = planning.make_plan(table, SETTINGS)
    for plan in (before, after):
        batches = planning.make_batches(plan, 4)
        ids = plan.images.column("id").take(batches.order).to_pylist()
        shapes = plan.shape[plan.images.column("row").take(batches.order).to_numpy()]
        plan.batch_ids = [tuple(ids[a:b]) for a, b in zip(batches.starts[:-1], batches.starts[1:])]
        plan.last = {s: plan.batch_ids[k] for k, s in enumerate(shapes[batches.starts[:-1]])}
    last = set(before.last.values())
    assert [b for b in before.batch_ids if b not in last] == [b for b in after.batch_ids if b in
                                                              set(before.batch_ids) - last]


def test_source_reads_columns_and_takes_rows_across_files(tmp_path):
    table = mixed_table(500, seed=4)
    (tmp_path / "t").mkdir()
    pq.write_table(table.slice(0, 200), tmp_path / "t" / "a.parquet", row_group_size=30)
    pq.write_table(table.slice(200).drop_columns(["note"]), tmp_path / "t" / "b.parquet", row_group_size=64)
    source = planning.Source(str(tmp_path / "t"))
    assert source.num_rows == 500
    whole = planning.read_table(str(tmp_path / "t"))
    assert source.read(["prompt", "seed", "nope"]) == whole.select(["prompt", "seed"])
    rows = np.array([499, 3, 250, 3, 199, 200, 0])
    assert source.take(rows) == whole.take(rows)
    assert source.take(rows, ["note"]).column("note").to_pylist()[:2] == [None, "carried 3"]
    assert source.take(np.array([], np.int64), ["id"]).num_rows == 0


def test_jobs_plan_prints_what_run_would_do_and_starts_nothing(tmp_path, capsys, model):
    table = mixed_table(300, seed=5)
    pq.write_table(table, tmp_path / "t.parquet")
    out = tmp_path / "out"
    command = ["plan", str(tmp_path / "t.parquet"), "--output", str(out), "--batch-size", "3", "--steps", "2",
               "--model", model, "--width", "64", "--height", "64"]
    settings = dict(planning.DEFAULTS, steps=2, width=64, height=64)
    old = reference.make_plan(table, settings)
    assert cli.main(command) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"{len(old.rows) + len(old.errors)} images planned from 300 rows" in printed
    assert f"0 already done, {len(old.errors)} failed, {len(old.rows)} to generate" in printed

    # OUT holds some of the table's images and errors (and an id from elsewhere)
    done = [r["id"] for r in old.rows[::4]] + ["elsewhere"]
    failed = [e["id"] for e in old.errors[::3]]
    (out / "manifest").mkdir(parents=True)
    (out / "errors").mkdir()
    pq.write_table(pa.table({"id": done}), out / "manifest" / "part-a.parquet")
    pq.write_table(pa.table({"id": failed}), out / "errors" / "part-a.parquet")
    work, new_errors = reference.work(old, 3, set(done) | set(failed))
    todo = sum(not r["skip"] for b in work for r in b)
    assert cli.main(command) == 0
    printed = capsys.readouterr().out
    assert f"{len(done) - 1} already done, {len(set(failed) | {e['id'] for e in new_errors})} failed, " \
           f"{todo} to generate" in printed
    assert f"{len(work)} of {len(reference.make_batches(old.rows, 3))} batches to run" in printed
    rows = [line.split() for line in printed.splitlines()[3:]]
    assert len(rows) == len({planning.shape_key(r) for r in old.rows}) > 1
    assert [sum(int(r[k]) for r in rows) for k in (-4, -2, -1)] == [len(old.rows), len(work), todo]
    assert sorted(out.rglob("*")) == sorted([out / "manifest", out / "errors", out / "manifest" / "part-a.parquet",
                                             out / "errors" / "part-a.parquet"])  # nothing written
    assert cli.main([*command, "--overwrite"]) == 0  # plans as if OUT were empty; deletes nothing
    assert "0 already done" in capsys.readouterr().out and (out / "manifest" / "part-a.parquet").exists()


@pytest.mark.parametrize("table, message", [
    ("missing.parquet", r"missing.parquet does not exist"),
    ({"text": ["a"]}, r"has no 'prompt' column"),
    ({"prompt": ["a"], "row": [1]}, r"column 'row' clashes"),
])
def test_jobs_plan_exits_2_on_bad_input(tmp_path, capsys, table, message, model):
    path = tmp_path / (table if isinstance(table, str) else "t.parquet")
    if not isinstance(table, str):
        pq.write_table(pa.table(table), path)
    assert cli.main(["plan", str(path), "--output", str(tmp_path / "out"), "--model", model]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert cli.main(["plan", str(ROOT / "jobs/example_prompts.parquet"), "--output", str(tmp_path / "out"),
                     "--model", model, "--width", "60"]) == 2
    assert "--width 60 is not a positive multiple of 8" in capsys.readouterr().err


def test_work_blocks_carry_each_batch_whole_with_its_carried_columns(tmp_path, monkeypatch):
    from sdbatch.jobs import generate

    table = mixed_table(400, seed=6)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=50)
    source = planning.Source(str(tmp_path / "t.parquet"))
    plan = planning.make_plan(source.read(list(planning.COLUMN_KINDS)), SETTINGS)
    batches = planning.make_batches(plan, 3)
    done = plan.images.column("id").to_pylist()[::5]
    work = planning.select_work(plan, batches, pa.array(done, pa.string()))
    monkeypatch.setattr(generate, "MAX_BLOCKS", 7)  # several batches per block, several chunks
    monkeypatch.setattr(generate, "CHUNK_BATCHES", 20)
    blocks = list(generate.work_blocks(plan, work, source))
    assert len(blocks) <= 7 + 1
    got = [batch for block in blocks for batch in block.column("rows").to_pylist()]
    want = [plan.rows(work.order[a:b]) for a, b in zip(work.starts[:-1], work.starts[1:])]
    assert [[{k: v for k, v in r.items() if k in want[0][0]} for r in b] for b in got] == want
    notes = table.column("note").to_pylist()
    flat = [r for b in got for r in b]
    assert [r["carried"] for r in flat] == [{"note": notes[r["row"]]} for r in flat]
    assert [r["skip"] for r in flat] == [r["id"] in set(done) for r in flat]
    assert [r["plan_index"] for r in flat] == work.order.tolist()


def test_the_recorder_writes_each_image_once_with_carried_columns_and_error_rows(tmp_path):
    from sdbatch.actors import result_schema
    from sdbatch.jobs.output import Output
    from sdbatch.jobs.record import Recorder

    table = mixed_table(120, seed=7)
    pq.write_table(table, tmp_path / "t.parquet")
    source = planning.Source(str(tmp_path / "t.parquet"))
    plan = planning.make_plan(source.read(list(planning.COLUMN_KINDS)), SETTINGS)
    rows = plan.columns(np.arange(plan.images.num_rows))
    n = rows.num_rows
    carried = pa.StructArray.from_arrays([source.take(rows.column("row").to_numpy(), ["note"]).column("note")
                                          .combine_chunks()], names=["note"])
    failed = np.arange(n) % 7 == 3
    results = pa.table({**{c: rows.column(c) for c in rows.column_names}, "plan_index": pa.array(np.arange(n)),
                        "carried": carried,
                        **{f.name: pa.array([None] * n, f.type) for f in result_schema() if f.name != "id"}})
    results = results.set_column(results.schema.get_field_index("error"), "error",
                                 pa.array([f"broken {i}" if f else None for i, f in enumerate(failed)]))
    results = results.set_column(results.schema.get_field_index("model_hash"), "model_hash", pa.array(["h"] * n))
    out = Output(str(tmp_path / "out"))
    recorder = Recorder(out, source, n)
    recorder.FLUSH_ROWS = 10
    half = n // 2
    assert recorder.add(results.slice(0, half)) == (int((~failed[:half]).sum()), int(failed[:half].sum()))
    again = pa.concat_tables([results.slice(half - 5, 10), results.slice(half - 5, 10)])  # delivered twice
    assert recorder.add(again) == (int((~failed[half:half + 5]).sum()), int(failed[half:half + 5].sum()))
    recorder.add(results.slice(half + 5))
    recorder.flush()
    assert recorder.model_hash == "h"
    manifest, errors = out.read("manifest"), out.read("errors")
    assert sorted(manifest.column("id").to_pylist()) == sorted(np.array(rows.column("id").to_pylist())[~failed])
    assert manifest.column_names[-1] == "note"
    by_id = {r["id"]: r for r in manifest.to_pylist()}
    for r in rows.to_pylist():
        if r["id"] in by_id:
            assert {k: by_id[r["id"]][k] for k in r if k != "row"} == {k: v for k, v in r.items() if k != "row"}
            assert by_id[r["id"]]["note"] == f"carried {r['row']}"
    assert errors.num_rows == failed.sum()
    for e in errors.to_pylist():  # an error row holds the table row's own columns, as in the table
        assert e["error"].startswith("broken") and e["note"] == f"carried {e['row']}"
        assert e["prompt"] == table.column("prompt")[e["row"]].as_py()
        assert e["width"] == table.column("width")[e["row"]].as_py()
