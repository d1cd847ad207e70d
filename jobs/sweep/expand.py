"""Expand a sweep spec (prompts x seeds x guidance scales) into a prompt table for the job.

    python jobs/sweep/expand.py jobs/sweep/spec.yaml sweep.parquet

The spec (YAML or JSON) lists `prompts`, `seeds` and `cfg_scales`; every combination becomes
one row with the columns `id`, `prompt`, `seed`, `cfg_scale` and `prompt_index` (the prompt's
position in the spec, handy for grouping the results). Optional scalar keys `negative_prompt`,
`steps`, `sampler`, `width` and `height` are copied to every row; keys left out fall back to
the job's command-line defaults. Ids look like `p01-s3-cfg7.5` (prompt 1, seed 3, cfg 7.5).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

AXES = {"prompts": str, "seeds": int, "cfg_scales": float}
CONSTANTS = {"negative_prompt": (str, pa.string()), "steps": (int, pa.int64()), "sampler": (str, pa.string()),
             "width": (int, pa.int64()), "height": (int, pa.int64())}


def _axis(spec: dict[str, Any], key: str, kind: type) -> list:
    values = spec.get(key)
    if not isinstance(values, list) or not values:
        raise ValueError(f"spec key '{key}' must be a non-empty list")
    for i, value in enumerate(values):
        # exact types: YAML's true/false must not pass as 1/0; an int is a valid guidance scale
        ok = type(value) is kind or (kind is float and type(value) is int)
        if not ok or (kind is str and not value.strip()):
            raise ValueError(f"spec key '{key}', item {i}: expected a non-empty {kind.__name__}, got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"spec key '{key}' lists a value twice")
    return [kind(v) for v in values]


def expand(spec: dict[str, Any]) -> pa.Table:
    """The prompt table for `spec`: one row per (prompt, seed, cfg_scale)."""
    if not isinstance(spec, dict):
        raise ValueError("a sweep spec must be a mapping with 'prompts', 'seeds' and 'cfg_scales'")
    unknown = set(spec) - set(AXES) - set(CONSTANTS) - {"name"}
    if unknown:
        raise ValueError(f"unknown spec keys: {', '.join(sorted(unknown))}")
    prompts, seeds, scales = (_axis(spec, key, kind) for key, kind in AXES.items())
    width = len(str(len(prompts) - 1))
    columns: dict[str, list] = {"id": [], "prompt": [], "seed": [], "cfg_scale": [], "prompt_index": []}
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            for scale in scales:
                columns["id"].append(f"p{p:0{width}d}-s{seed}-cfg{scale!r}")
                columns["prompt"].append(prompt)
                columns["seed"].append(seed)
                columns["cfg_scale"].append(scale)
                columns["prompt_index"].append(p)
    table = pa.table({"id": pa.array(columns["id"], pa.string()), "prompt": pa.array(columns["prompt"], pa.string()),
                      "seed": pa.array(columns["seed"], pa.int64()),
                      "cfg_scale": pa.array(columns["cfg_scale"], pa.float64()),
                      "prompt_index": pa.array(columns["prompt_index"], pa.int64())})
    for key, (kind, arrow_type) in CONSTANTS.items():
        if key in spec:
            value = spec[key]
            if type(value) is not kind:
                raise ValueError(f"spec key '{key}' must be a single {kind.__name__}, got {value!r}")
            table = table.append_column(key, pa.array([value] * table.num_rows, arrow_type))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path, help="sweep spec, YAML or JSON")
    parser.add_argument("output", help="Parquet file to write")
    args = parser.parse_args(argv)
    try:
        table = expand(yaml.safe_load(args.spec.read_text()))
    except (OSError, ValueError, yaml.YAMLError) as e:
        parser.exit(2, f"error: {args.spec}: {e}\n")
    pq.write_table(table, args.output)
    print(f"wrote {table.num_rows} rows to {args.output}")


if __name__ == "__main__":
    main()
