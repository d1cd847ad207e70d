"""Build the MS-COCO 30k caption table (the FID-30K evaluation prompts) from a COCO captions file.

    python jobs/coco30k/build_table.py captions_val2014.json coco30k.parquet \
        [--reference-images val2014/ --reference-out coco30k-ref/]

Input: a COCO captions annotation file (`captions_val2014.json` from the 2014 train/val
annotations archive): `images` (id, file_name) and `annotations` (id, image_id, caption).

Sampling, chosen so anyone can reproduce it without this script or a particular numpy:
- every image that has at least one caption is ranked by sha256("<seed>:<image_id>") and the
  first `--num-images` (default 30,000) images are kept, so the 30k images are distinct;
- each kept image gets one of its captions: captions sorted by annotation id, index
  int(sha256("<seed>:<image_id>:caption"), 16) mod (number of captions);
- the caption is stripped and its runs of whitespace collapsed to one space.
The real images of the same rows (`file_name`) are the reference set for FID-30K: with
`--reference-images` (the folder of val2014 JPEGs) they are center-cropped to a square, resized
to `--reference-size` (default 512, the generated size) with bicubic filtering and written to
`--reference-out` as `<id>.png` (files already there are kept).

Output columns: `id` ("coco-<image_id>"), `prompt`, `image_id`, `caption_id`, `file_name`;
rows sorted by image_id. The job carries `image_id`, `caption_id` and `file_name` through to
its manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_NUM_IMAGES = 30_000
DEFAULT_SEED = 0

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("image_id", pa.int64()),
        ("caption_id", pa.int64()),
        ("file_name", pa.string()),
    ]
)


def _rank(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16)


def _read_captions(captions: dict[str, Any], source: str) -> tuple[dict[int, str], dict[int, list]]:
    for key in ("images", "annotations"):
        if not isinstance(captions.get(key), list):
            raise ValueError(f"{source}: no '{key}' list; expected a COCO captions file such as captions_val2014.json")
    file_names = {}
    for i, image in enumerate(captions["images"]):
        try:
            file_names[int(image["id"])] = str(image["file_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: images[{i}] needs an integer 'id' and a 'file_name' ({e!r})") from None
    by_image: dict[int, list] = {}
    for i, ann in enumerate(captions["annotations"]):
        try:
            image_id, caption_id, caption = int(ann["image_id"]), int(ann["id"]), ann["caption"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{source}: annotations[{i}] needs integer 'id' and 'image_id' and a 'caption' ({e!r})"
            ) from None
        if image_id not in file_names:
            raise ValueError(f"{source}: annotations[{i}] refers to image_id {image_id}, which is not in 'images'")
        text = " ".join(str(caption).split())
        if text:
            by_image.setdefault(image_id, []).append((caption_id, text))
    return file_names, by_image


def build_table(captions: dict[str, Any], num_images: int = DEFAULT_NUM_IMAGES, seed: int = DEFAULT_SEED,
                source: str = "captions") -> pa.Table:
    """One caption for each of `num_images` distinct images, sampled as the module docstring says."""
    file_names, by_image = _read_captions(captions, source)
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if num_images > len(by_image):
        raise ValueError(f"{source}: asked for {num_images} images but only {len(by_image)} have captions")
    chosen = sorted(sorted(by_image, key=lambda image_id: _rank(f"{seed}:{image_id}"))[:num_images])
    rows = []
    for image_id in chosen:
        options = sorted(by_image[image_id])
        caption_id, text = options[_rank(f"{seed}:{image_id}:caption") % len(options)]
        rows.append({"id": f"coco-{image_id}", "prompt": text, "image_id": image_id,
                     "caption_id": caption_id, "file_name": file_names[image_id]})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_reference_images(table: pa.Table, images_dir: Path, out_dir: Path, size: int) -> int:
    """Center-cropped, resized PNGs of the table's real images; returns how many were written."""
    from PIL import Image
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for row_id, file_name in tqdm(zip(table["id"].to_pylist(), table["file_name"].to_pylist()),
                                  total=table.num_rows, desc="reference images", unit="img"):
        target = out_dir / f"{row_id}.png"
        if target.exists():
            continue
        source = images_dir / file_name
        try:
            with Image.open(source) as im:
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        except OSError as e:
            raise ValueError(f"row {row_id}: cannot read {source} ({e})") from None
        partial = target.with_suffix(".png.partial")
        im.save(partial, format="PNG")
        partial.rename(target)
        written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("captions", type=Path, help="COCO captions file, e.g. captions_val2014.json")
    parser.add_argument("output", help="Parquet file to write, e.g. coco30k.parquet")
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="images (= rows) to sample")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed")
    parser.add_argument("--reference-images", type=Path, metavar="DIR", help="folder of the val2014 images")
    parser.add_argument("--reference-out", type=Path, metavar="DIR", help="where to write the reference PNGs")
    parser.add_argument("--reference-size", type=int, default=512, help="side of the reference PNGs")
    args = parser.parse_args(argv)
    if (args.reference_images is None) != (args.reference_out is None):
        parser.error("--reference-images and --reference-out go together")
    try:
        captions = json.loads(args.captions.read_text())
        table = build_table(captions, args.num_images, args.seed, source=str(args.captions))
        pq.write_table(table, args.output)
        print(f"wrote {table.num_rows} prompts to {args.output}")
        if args.reference_images:
            n = write_reference_images(table, args.reference_images, args.reference_out, args.reference_size)
            print(f"wrote {n} reference images to {args.reference_out}")
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
