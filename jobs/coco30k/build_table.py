"""Build the MS-COCO 30k caption table (the FID-30K evaluation prompts) from a COCO captions file.

    python jobs/coco30k/build_table.py captions_val2014.json coco30k.parquet

Input: a COCO captions annotation file (`captions_val2014.json` from the 2014 train/val
annotations archive): `images` (id, file_name) and `annotations` (id, image_id, caption).

Sampling, chosen so anyone can reproduce it without this script or a particular numpy:
- every image that has at least one caption is ranked by sha256("<seed>:<image_id>") and the
  first `--num-images` (default 30,000) images are kept, so the 30k images are distinct;
- each kept image gets one of its captions: captions sorted by annotation id, index
  int(sha256("<seed>:<image_id>:caption"), 16) mod (number of captions);
- the caption is stripped and its runs of whitespace collapsed to one space.
The real images of the same rows (`file_name`) are the reference set for FID-30K.

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("captions", type=Path, help="COCO captions file, e.g. captions_val2014.json")
    parser.add_argument("output", help="Parquet file to write, e.g. coco30k.parquet")
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="images (= rows) to sample")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed")
    args = parser.parse_args(argv)
    try:
        captions = json.loads(args.captions.read_text())
        table = build_table(captions, args.num_images, args.seed, source=str(args.captions))
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    pq.write_table(table, args.output)
    print(f"wrote {table.num_rows} prompts to {args.output}")


if __name__ == "__main__":
    main()
