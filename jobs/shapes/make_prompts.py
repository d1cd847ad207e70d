"""Writes jobs/shapes/prompts.parquet: the demo's prompt table for sdbatch's built-in model.

    python jobs/shapes/make_prompts.py [OUT]

24 rows (id, prompt, seed, num_images, split): 22 prompts of triples the model was trained on
and 2 of triples held out of its training data (dataset seed 0), in the grammar
"a [small|large] <colour> <shape> on a <colour> background[, <position>]". Every shape,
colour, size and position appears; seeds are fixed so the demo's pictures are the same on every
run; four rows ask for two images (num_images), 28 images in all. Deterministic.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.data.shapes import POSITIONS, Attributes, held_out_triples, prompt_text, seen_triples

DATA_SEED = 0  # the --seed of the built-in model's training table
SEEN, HELD_OUT = 22, 2


def rows() -> list[dict]:
    rng = np.random.default_rng(2026)
    seen = seen_triples(DATA_SEED)
    picks = [("seen", seen[i]) for i in rng.choice(len(seen), SEEN, replace=False)]
    picks += [("held_out", t) for t in held_out_triples(DATA_SEED)[:HELD_OUT]]
    positions = list(POSITIONS)
    out = []
    for i, (split, triple) in enumerate(picks):
        if i % 3 == 0:
            attrs = Attributes(*triple, "large", "center" if i % 2 else None)
        elif i % 3 == 1:
            attrs = Attributes(*triple, "small", positions[i % len(positions)])
        else:
            attrs = Attributes(*triple)
        prompt = prompt_text(attrs)
        out.append({
            "id": "-".join(w for w in (attrs.size, attrs.color, attrs.shape, "on", attrs.background, attrs.position) if w)
                      .replace(" ", "-"),
            "prompt": prompt,
            "seed": 1000 + i,
            "num_images": 2 if i % 6 == 5 else None,
            "split": split,
        })
    return out


def main(out: str = str(Path(__file__).with_name("prompts.parquet"))) -> None:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                        ("num_images", pa.int64()), ("split", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows(), schema=schema), out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
