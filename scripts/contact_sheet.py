"""A contact sheet of a run's images, with their prompts: one PNG.

    python scripts/contact_sheet.py out/shapes -o docs/demo-contact-sheet.png

Reads OUT (the output folder of `python -m sdbatch.jobs run`, local or a URI): every image of its
manifest, held-out rows (a `split` column of "held_out", as in jobs/shapes/prompts.parquet) last,
captioned with its prompt. A prompt in the shapes grammar gets a frame: green when the adherence
checker (`sdbatch.data.adherence.check`) reads back every attribute it names, red when not.
The title says which model and settings made them (OUT/run.json). Default output:
OUT/contact-sheet.png. Exit status 2 when OUT holds no images.
"""

import argparse
import sys

import fsspec
import numpy as np

from sdbatch import storage
from sdbatch.data import adherence
from sdbatch.images import read_image
from sdbatch.jobs.output import Output
from sdbatch.sheet import RIGHT, WRONG, contact_sheet


def frame(image: np.ndarray, prompt: str):
    try:
        return RIGHT if adherence.check(image, prompt)["all_correct"] else WRONG
    except ValueError:  # not a prompt of the shapes grammar: no verdict
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", metavar="OUT", help="a run's output folder (path or URI)")
    parser.add_argument("-o", "--png", help="the contact sheet (default: OUT/contact-sheet.png)")
    parser.add_argument("--columns", type=int, default=7, help="images per row (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=2, help="enlargement, nearest neighbour (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Output(args.output)
    manifest = out.read("manifest")
    rows = [r for r in (manifest.to_pylist() if manifest is not None else []) if r["image"]]
    if not rows:
        print(f"error: {args.output} holds no images (no manifest rows with an image)", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: (r.get("split") == "held_out", r["id"]))
    images = []
    for r in rows:
        with fsspec.open(r["image"], "rb") as f:
            images.append(np.asarray(read_image(f, r["image"])))
    captions = [r["prompt"] + (" [held out]" if r.get("split") == "held_out" else "") for r in rows]
    frames = [frame(image, r["prompt"]) for image, r in zip(images, rows)]
    run = out.read_run() or {}
    s = run.get("settings", {})
    title = [f"{run.get('model_source', '?')} (sha256 {str(run.get('model_hash'))[:10]}): {len(rows)} images, "
             f"{s.get('steps')} steps, {s.get('sampler')}, guidance {s.get('cfg_scale')}, {s.get('width')}x{s.get('height')}"]
    if any(f is not None for f in frames):
        right = sum(f == RIGHT for f in frames)
        title.append(f"frame: green, the adherence checker reads back every attribute of the prompt "
                     f"({right} of {sum(f is not None for f in frames)}); red, not")
    sheet = contact_sheet(images, captions, frames, columns=args.columns, scale=args.scale, title="\n".join(title))
    target = args.png or storage.join(args.output, "contact-sheet.png")
    with fsspec.open(target, "wb") as f:
        sheet.save(f, format="PNG", optimize=True)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
