"""The example job inputs under jobs/: the COCO-30k caption table builder and the sweep expander
make tables the job accepts, with the documented sampling and ids."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from sdbatch.jobs import plan as jobs

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"jobs_{Path(path).parent.name}_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_table = load_script("jobs/coco30k/build_table.py")
expand = load_script("jobs/sweep/expand.py")


def job_plan(path: Path) -> jobs.Plan:
    """What the job makes of a table: schema check, then ids, seeds and per-row checks."""
    return jobs.make_plan(jobs.read_table(str(path)), dict(jobs.DEFAULTS))


def synthetic_captions(n_images: int = 60) -> dict:
    """A captions file in the COCO layout: image i has i % 5 captions (so some have none)."""
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg"} for i in range(n_images)]
    annotations, ann_id = [], 500
    for i in range(n_images):
        for j in range(i % 5):
            annotations.append({"id": ann_id, "image_id": 1000 + i, "caption": f"  image {i}\ncaption  {j} "})
            ann_id -= 1  # annotation ids not in image order
    return {"images": images, "annotations": annotations}


def test_shipped_coco_sample_is_the_builders_output_and_the_job_accepts_it(tmp_path):
    out = tmp_path / "sample.parquet"
    subprocess.run([sys.executable, str(ROOT / "jobs/coco30k/build_table.py"),
                    str(ROOT / "jobs/coco30k/sample_captions.json"), str(out), "--num-images", "8"],
                   check=True, capture_output=True)
    shipped = pq.read_table(ROOT / "jobs/coco30k/sample.parquet")
    assert pq.read_table(out).equals(shipped)
    plan = job_plan(ROOT / "jobs/coco30k/sample.parquet")
    assert not plan.errors.num_rows
    assert [r["id"] for r in plan.rows()] == shipped.column("id").to_pylist()
    assert [r["prompt"] for r in plan.rows()] == shipped.column("prompt").to_pylist()


def test_coco_sampling_follows_the_documented_rule():
    captions = synthetic_captions()
    table = build_table.build_table(captions, num_images=20, seed=7)
    rows = table.to_pylist()
    with_captions = sorted({a["image_id"] for a in captions["annotations"]})

    def rank(key):
        return int(hashlib.sha256(key.encode()).hexdigest(), 16)

    expected = sorted(sorted(with_captions, key=lambda i: rank(f"7:{i}"))[:20])
    assert [r["image_id"] for r in rows] == expected
    for r in rows:
        options = sorted((a["id"], a["caption"]) for a in captions["annotations"] if a["image_id"] == r["image_id"])
        caption_id, text = options[rank(f"7:{r['image_id']}:caption") % len(options)]
        assert r["caption_id"] == caption_id
        assert r["prompt"] == " ".join(text.split())
        assert r["id"] == f"coco-{r['image_id']}" and r["file_name"].endswith(f"{r['image_id']:012d}.jpg")
    assert build_table.build_table(captions, num_images=20, seed=7).equals(table)
    assert build_table.build_table(captions, num_images=20, seed=8)["image_id"] != table["image_id"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["annotations"].append({"id": 1, "image_id": 5, "caption": "x"}),
         "annotations[120] refers to image_id 5"),
        (lambda c: c["images"][3].pop("file_name"), "images[3] needs an integer 'id' and a 'file_name'"),
        (lambda c: c.pop("annotations"), "no 'annotations' list"),
        (lambda c: None, "asked for 100 images but only 48 have captions"),
    ],
)
def test_coco_builder_errors_name_the_problem(change, message):
    captions = synthetic_captions()
    change(captions)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_table.build_table(captions, num_images=100, source="captions.json")


def test_coco_builder_cli_fails_cleanly_on_a_bad_file(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"images": []}))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/coco30k/build_table.py"), str(bad),
                           str(tmp_path / "out.parquet")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no 'annotations' list" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_sweep_expands_to_every_combination_and_the_job_accepts_it(tmp_path):
    out = tmp_path / "sweep.parquet"
    subprocess.run([sys.executable, str(ROOT / "jobs/sweep/expand.py"), str(ROOT / "jobs/sweep/spec.yaml"),
                    str(out)], check=True, capture_output=True)
    spec = yaml.safe_load((ROOT / "jobs/sweep/spec.yaml").read_text())
    rows = pq.read_table(out).to_pylist()
    combos = {(r["prompt"], r["seed"], r["cfg_scale"]) for r in rows}
    assert len(rows) == len(combos) == len(spec["prompts"]) * len(spec["seeds"]) * len(spec["cfg_scales"])
    assert combos == {(p, s, float(c)) for p in spec["prompts"] for s in spec["seeds"] for c in spec["cfg_scales"]}
    assert {r["negative_prompt"] for r in rows} == {spec["negative_prompt"]}
    assert all(spec["prompts"][r["prompt_index"]] == r["prompt"] for r in rows)

    plan = job_plan(out)
    assert not plan.errors.num_rows
    by_id = {r["id"]: r for r in plan.rows()}
    assert len(by_id) == len(rows)
    # the table's values reach the job: its seed, guidance scale, steps and sampler, not the defaults
    for r in rows:
        planned = by_id[r["id"]]
        assert (planned["seed"], planned["cfg_scale"], planned["steps"], planned["sampler"]) == (
            r["seed"], r["cfg_scale"], spec["steps"], spec["sampler"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(seeds=[0, True]), "'seeds', item 1: expected a non-empty int, got True"),
        (lambda s: s.update(prompts=[]), "'prompts' must be a non-empty list"),
        (lambda s: s.update(prompts=["a cat", "  "]), "'prompts', item 1"),
        (lambda s: s.update(cfg_scales=[7.5, 7.5]), "'cfg_scales' lists a value twice"),
        (lambda s: s.update(cfg_scale=[7.5]), "unknown spec keys: cfg_scale"),
        (lambda s: s.update(steps="25"), "'steps' must be a single int"),
    ],
)
def test_sweep_spec_errors_name_the_key(change, message):
    spec = {"prompts": ["a cat"], "seeds": [0, 1], "cfg_scales": [5, 7.5]}
    assert expand.expand(spec).num_rows == 4
    change(spec)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand.expand(spec)


def test_coco_reference_images_are_center_cropped_and_resized(tmp_path):
    import numpy as np
    from PIL import Image

    captions = synthetic_captions(8)
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    images = tmp_path / "val2014"
    images.mkdir()
    for image in captions["images"]:
        # 60x30: red | green (the centered 30x30 square) | blue
        pixels = np.zeros((30, 60, 3), np.uint8)
        pixels[:, :15, 0] = pixels[:, 15:45, 1] = pixels[:, 45:, 2] = 255
        Image.fromarray(pixels).save(images / image["file_name"], quality=95)
    cmd = [sys.executable, str(ROOT / "jobs/coco30k/build_table.py"), str(tmp_path / "captions.json"),
           str(tmp_path / "t.parquet"), "--num-images", "3", "--reference-images", str(images),
           "--reference-out", str(tmp_path / "ref"), "--reference-size", "16"]
    subprocess.run(cmd, check=True, capture_output=True)
    ids = pq.read_table(tmp_path / "t.parquet").column("id").to_pylist()
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == sorted(f"{i}.png" for i in ids)
    for i in ids:
        ref = np.asarray(Image.open(tmp_path / "ref" / f"{i}.png"))
        assert ref.shape == (16, 16, 3)
        inner = ref[:, 2:-2]  # JPEG's chroma subsampling bleeds a pixel across the band edges
        assert inner[..., 1].min() > 200 and inner[..., [0, 2]].max() < 60, "not the center square"

    # a missing image names its row; images already written are kept
    (images / captions["images"][1]["file_name"]).unlink()
    (tmp_path / "ref" / "coco-1001.png").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "row coco-1001: cannot read" in proc.stderr
