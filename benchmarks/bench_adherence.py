"""Prompt adherence on the shapes domain (issue 14): the share of generated images that show
every attribute their prompt names, read back by `sdbatch.data.adherence.check`.

    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_adherence.py [--model builtin:shapes] \
        [--dataset TRAIN.parquet | --data-seed 0] [--n 200] [--out out/adherence]

Prompts: --n of the triples the model was trained on and --n of the held-out ones, in the
canonical grammar ("a small red circle on a blue background, top left"; size and position
sometimes left out), from `sdbatch.data.evaluation_prompts`. The held-out triples come from the
training table's metadata (--dataset) or from the seed it was made with (--data-seed).
Generation as the issue's targets ask: the default sampler (dpmpp_2m_karras), 20 steps,
guidance 7.5, 64x64, one seed per prompt (--seed + index). Targets for the built-in model:
all attributes right on >= 90% of seen-triple prompts and >= 75% of held-out ones. A random-weight
model scores about 0%. With --out: results.json (every prompt's read-back) and a contact sheet per
split (sheet-seen.png, sheet-held_out.png; green frame: all right, red: something wrong).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sdbatch
from sdbatch import builtin
from sdbatch.data import adherence, shapes
from sdbatch.sheet import RIGHT, WRONG, contact_sheet

SPLITS = ("seen", "held_out")
TARGETS = {"seen": 0.90, "held_out": 0.75}


def generate_split(model, prompts: list[str], args) -> np.ndarray:
    """uint8 (n, 64, 64, 3), batch by batch, seeds args.seed + index."""
    out = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        out.append(sdbatch.generate(model, batch, seeds=seeds, steps=args.steps, cfg_scale=args.cfg_scale,
                                    sampler=args.sampler, width=args.size, height=args.size, progress=False))
        print(f"  {start + len(batch)}/{len(prompts)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return np.concatenate(out)


def fmt(share: float | None) -> str:
    return "   -  " if share is None else f"{share:6.1%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=builtin.DEFAULT,
                        help="checkpoint (local path, fsspec URI or builtin:NAME) for sdbatch.load_model (default: %(default)s)")
    parser.add_argument("--dataset", help="the training table (.parquet): its metadata names the held-out triples")
    parser.add_argument("--data-seed", type=int, default=0, help="--seed of the training table, if --dataset is not given")
    parser.add_argument("--n", type=int, default=200, help="prompts per split (seen, held out)")
    parser.add_argument("--seed", type=int, default=0, help="draws the prompts; image i gets seed --seed + i")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=7.5)
    parser.add_argument("--sampler", default="dpmpp_2m_karras")
    parser.add_argument("--size", type=int, default=shapes.SIDE)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for results.json and the contact sheets")
    args = parser.parse_args()
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be at least 1")

    torch.set_num_threads(args.threads)
    if args.dataset:
        meta = shapes.read_metadata(args.dataset)
        held, data_seed = meta["held_out"], meta["seed"]
    else:
        data_seed = args.data_seed
        held = shapes.held_out_triples(data_seed)
    print(f"held-out triples (data seed {data_seed}): {', '.join(' '.join(t) for t in held)}")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = sdbatch.load_model(args.model, device=args.device, dtype=dtype)
    print(f"model {args.model} (sha256 {model.hash[:12]}) on {model.device}, {str(model.dtype).removeprefix('torch.')}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")

    report = {"model": str(args.model), "sha256": model.hash, "data_seed": data_seed, "held_out": held,
              "settings": {k: getattr(args, k) for k in ("n", "seed", "steps", "cfg_scale", "sampler", "size")},
              "splits": {}}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        prompts = shapes.evaluation_prompts(args.n, held_out=split == "held_out", seed=args.seed, data_seed=data_seed)
        start = time.perf_counter()
        images = generate_split(model, prompts, args)
        seconds = time.perf_counter() - start
        results = [adherence.check(image, prompt) for image, prompt in zip(images, prompts)]
        summary = adherence.summarize(results)
        report["splits"][split] = {"summary": summary, "seconds": seconds,
                                   "rows": [{"prompt": p, "seed": args.seed + i, **r} for i, (p, r) in enumerate(zip(prompts, results))]}
        if args.out:
            contact_sheet(images[:100], frames=[RIGHT if r["all_correct"] else WRONG for r in results[:100]],
                          columns=10).save(args.out / f"sheet-{split}.png")

    print(f"\n{'split':9} {'n':>4} {'all right':>9}  " + "  ".join(f"{a:>10}" for a in adherence.ATTRIBUTES) + "  target  s/image")
    for split in SPLITS:
        s = report["splits"][split]
        summary = s["summary"]
        per = "  ".join(f"{fmt(summary['per_attribute'][a]['correct']):>10}" for a in adherence.ATTRIBUTES)
        print(f"{split:9} {summary['n']:4d} {fmt(summary['all_correct']):>9}  {per}  {TARGETS[split]:5.0%}  "
              f"{s['seconds'] / summary['n']:7.3f}")
    if args.out:
        (args.out / "results.json").write_text(json.dumps(report, indent=1, default=list))
        print(f"results and contact sheets in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
