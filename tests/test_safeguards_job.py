"""Safeguards in `jobs run` on a real local Ray: a blocked prompt goes to the errors naming its
rule, an image the safety checker flags is recorded (nsfw) but not written, the others carry
the watermark (read back from the job's PNGs with invisible-watermark's decoder), XMP and a
C2PA manifest that c2pa's Reader verifies; and `python -m sdbatch generate` does the same."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import sdbatch
from ray_fixtures import ray_head  # noqa: F401  (fixture)
from sdbatch.jobs import cli as jobs_cli
from sdbatch.model.safety import load_safety_checker
from sdbatch.provenance import TRAINED_ALGORITHMIC_MEDIA, payload_agreement, read_watermark
from test_safeguards import c2pa_material, random_reference, save_checker  # noqa: F401  (c2pa_material: fixture)

SIZE, STEPS = 256, 2
ROWS = [  # id, prompt, negative prompt, seed, size
    ("keep", "a harbour at dusk", "", 11, SIZE),
    ("flag", "a harbour at dusk", "", 12, SIZE),  # seed 11 + 1: `generate --num-images 2` makes both
    ("small", "a boat", "", 13, 128),
    ("blocked", "a red car on a bridge", "", 14, SIZE),
    ("blocked-negative", "a quiet street", "Red Car", 15, SIZE),
]
BLOCKLIST = "# test rules\nred car\nre:forbidden\\s+thing\n"


@pytest.fixture(scope="module")
def checker_flagging_one(tiny_safetensors, tmp_path_factory):
    """A safety checker whose thresholds flag row 'flag''s image and none of the others': the
    rows' images are made here first (float32, as the job will), and one concept's threshold
    is put halfway between 'flag''s similarity and the highest of the others'."""
    model = sdbatch.load_model(tiny_safetensors, dtype=torch.float32)
    made = {}
    for image_id, prompt, negative, seed, size in ROWS[:3]:
        made[image_id] = sdbatch.generate(model, [prompt], [negative], seeds=[seed], steps=STEPS, sampler="euler",
                                          width=size, height=size, progress=False)[0]
    folder = save_checker(random_reference(seed=1), tmp_path_factory.mktemp("checker"))
    ours = load_safety_checker(str(folder))
    ref = random_reference(seed=1)
    with torch.no_grad():
        pixels = ours.preprocess(list(made.values()))
        embeds = torch.nn.functional.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
        cos = embeds @ torch.nn.functional.normalize(ref.concept_embeds).T
        special = embeds @ torch.nn.functional.normalize(ref.special_care_embeds).T
        flag = list(made).index("flag")
        others = [i for i in range(len(made)) if i != flag]
        lead = cos[flag] - cos[others].max(0).values
        concept = int(lead.argmax())
        assert lead[concept] > 0.02, "no concept separates the 'flag' image (margin for batch differences)"
        ref.concept_embeds_weights.copy_(cos.max(0).values + 0.05)
        ref.concept_embeds_weights[concept] = cos[others, concept].max() + lead[concept] / 2
        ref.special_care_embeds_weights.copy_(special.max(0).values + 0.05)
    save_checker(ref, folder)
    return folder, made


def test_job_with_safeguards(ray_head, tiny_safetensors, checker_flagging_one, c2pa_material, tmp_path, capsys):
    import c2pa

    checker, made = checker_flagging_one
    certs, ca_pem = c2pa_material
    columns = list(zip(*ROWS))
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table(dict(id=list(columns[0]), prompt=list(columns[1]), negative_prompt=list(columns[2]),
                                 seed=list(columns[3]), width=list(columns[4]), height=list(columns[4]))), table)
    (tmp_path / "rules.txt").write_text(BLOCKLIST)
    out = tmp_path / "out"
    rc = jobs_cli.main([
        "run", str(table), "--model", str(tiny_safetensors), "--output", str(out), "--steps", str(STEPS),
        "--sampler", "euler", "--batch-size", "2", "--workers", "1", "--dtype", "float32",
        "--safety-checker", str(checker), "--blocklist", str(tmp_path / "rules.txt"),
        "--c2pa-cert", str(certs / "chain.pem"), "--c2pa-key", str(certs / "leaf.key")])
    err = capsys.readouterr().err
    assert rc == 1, err  # the blocked rows are errors
    assert "done: 3, errored: 2" in err and "1 images flagged by the safety checker" in err

    m = pq.read_table(out / "manifest").to_pandas().set_index("id")
    assert sorted(m.index) == ["flag", "keep", "small"]
    assert m["nsfw"].to_dict() == {"flag": True, "keep": False, "small": False}
    assert m["watermark"].to_dict() == {"flag": False, "keep": True, "small": False}  # 128x128: too small
    assert m["c2pa"].to_dict() == {"flag": False, "keep": True, "small": True}
    assert m.loc[["flag"], ["image", "latent", "sha256"]].isna().all(axis=None)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["keep.png", "small.png"]

    e = pq.read_table(out / "errors").to_pandas().set_index("id")
    assert sorted(e.index) == ["blocked", "blocked-negative"]
    assert "the prompt matches blocklist rule 'red car'" in e.loc["blocked", "error"]
    assert "rules.txt, line 2" in e.loc["blocked", "error"]
    assert "the negative prompt matches blocklist rule 'red car'" in e.loc["blocked-negative", "error"]

    keep = Path(m.loc["keep", "image"])
    with Image.open(keep) as im:
        pixels = np.asarray(im.convert("RGB"))
        assert im.text["parameters"].startswith("a harbour at dusk\nSteps: 2")
        assert TRAINED_ALGORITHMIC_MEDIA.encode() in im.info["xmp"]
    # At 256x256 invisible-watermark recovers most of the 136 bits, not always all of them
    # (from about 384x384 up it reads them all: tests/test_safeguards.py); unmarked, about half.
    assert payload_agreement(read_watermark(pixels)) >= 0.9
    assert payload_agreement(read_watermark(made["keep"])) < 0.75
    trust = c2pa.Context.from_dict({"verify": {"verify_trust": True}, "trust": {"trust_anchors": ca_pem}})
    reader = c2pa.Reader("image/png", io.BytesIO(keep.read_bytes()), context=trust)
    assert reader.get_validation_state() == "Trusted"


def test_generate_command_with_safeguards(tiny_safetensors, checker_flagging_one, tmp_path):
    checker, _ = checker_flagging_one
    (tmp_path / "rules.txt").write_text(BLOCKLIST)

    def generate(prompt, seed, *extra):
        return subprocess.run(
            [sys.executable, "-m", "sdbatch", "generate", prompt, "--model", str(tiny_safetensors),
             "-o", str(tmp_path / "out.png"), "--seed", str(seed), "--steps", str(STEPS), "--sampler", "euler",
             "--width", str(SIZE), "--height", str(SIZE), "--dtype", "float32", "--device", "cpu",
             "--safety-checker", str(checker), "--blocklist", str(tmp_path / "rules.txt"), *extra],
            capture_output=True, text=True, timeout=300)

    blocked = generate("a forbidden  thing", 1)
    assert blocked.returncode == 2 and "blocklist rule 're:forbidden\\s+thing'" in blocked.stderr
    assert "nothing generated" in blocked.stderr and not (tmp_path / "out.png").exists()
    # rows 'keep' and 'flag': one prompt, seeds 11 and 12
    run = generate(ROWS[0][1], ROWS[0][3], "--num-images", "2", "--no-watermark")
    assert run.returncode == 1, run.stderr  # an image was not written
    assert "out-1.png: seed 12: the safety checker flagged the image: not written" in run.stderr
    assert run.stdout.split() == [str(tmp_path / "out-0.png")] and not (tmp_path / "out-1.png").exists()
    with Image.open(tmp_path / "out-0.png") as im:
        assert TRAINED_ALGORITHMIC_MEDIA.encode() in im.info["xmp"]
        assert payload_agreement(read_watermark(np.asarray(im.convert("RGB")))) < 0.75  # --no-watermark
