"""Command line for one-off use: `python -m sdbatch generate "a prompt" [--model SRC] -o out.png`.

Without --model, `generate` uses sdbatch's built-in demo model (`builtin:shapes`, see
`sdbatch.builtin`), and says so.

`make-smoke-model PATH` writes a small random-weight checkpoint to try things without real
weights. The batch job over prompt tables is `python -m sdbatch.jobs`.
"""

import argparse
import dataclasses
import random
import sys
from pathlib import Path

from sdbatch.errors import exit_without_teardown
from sdbatch.extras import report_missing_extra
from sdbatch.model.samplers import SAMPLERS
from sdbatch.safeguards import add_arguments as add_safeguard_arguments

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _multiple_of_8(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError("must be a positive multiple of 8")
    return value


def _strength(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError("must be in [0, 2**64)")
    return value


def output_paths(output: Path, n: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png, ... for several."""
    return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from sdbatch import generate, load_model
    from sdbatch.a1111 import a1111_parameters
    from sdbatch.builtin import default_model
    from sdbatch.images import read_image
    from sdbatch.model.pipeline import NonFiniteError
    from sdbatch.model.weights import size_or_native
    from sdbatch.provenance import can_watermark
    from sdbatch.safeguards import SafeguardSettings, Safeguards

    if args.output.suffix.lower() != ".png":
        raise ValueError(f"-o {args.output}: the output must be a .png file")
    if args.seed + args.num_images > 2**64:
        raise ValueError(f"--seed {args.seed}: seeds up to seed + num_images - 1 must stay below 2**64")
    init_image = None if args.init_image is None else read_image(args.init_image, f"--init-image {args.init_image}")
    settings = SafeguardSettings.from_args(args)
    blocklist = settings.check()  # bad files fail here, before the model loads
    refused = blocklist.check(args.prompt, args.negative) if blocklist else None
    if refused:
        raise ValueError(f"{refused}: nothing generated")
    args.model = default_model(args.model)
    args.width, args.height = size_or_native(args.model, args.width, args.height)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    print(f"loading {args.model}", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=dtype, ema=args.ema)
    print(f"model on {model.device}, {str(model.dtype).removeprefix('torch.')}, seed {args.seed}", file=sys.stderr)
    guards = Safeguards(dataclasses.replace(settings, blocklist=None), device=str(model.device))
    if settings.watermark and not can_watermark(args.height, args.width):
        print(f"note: {args.width}x{args.height} images are written without the invisible watermark "
              f"(invisible-watermark needs at least 256x256 pixels); XMP still labels them", file=sys.stderr)

    paths = output_paths(args.output, args.num_images)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    row = dict(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, sampler=args.sampler,
        cfg_scale=args.cfg_scale, width=args.width, height=args.height,
        init_image=args.init_image, strength=args.strength,
    )
    failed = []
    for start in range(0, args.num_images, args.batch_size):
        seeds = [args.seed + i for i in range(start, min(args.num_images, start + args.batch_size))]
        bad = set()
        try:
            images = generate(
                model, [args.prompt] * len(seeds), [args.negative] * len(seeds), seeds=seeds, steps=args.steps,
                cfg_scale=args.cfg_scale, sampler=args.sampler, width=args.width, height=args.height,
                init_images=None if init_image is None else [init_image] * len(seeds), strength=args.strength,
            )
        except NonFiniteError as e:
            images, bad = e.images, set(e.rows)
        nsfw = guards.screen(images)  # before the watermark, as SD's scripts
        for k, (seed, image, path) in enumerate(zip(seeds, images, paths[start:])):
            if k in bad:
                failed.append(seed)
                print(f"error: {path}: seed {seed} came out non-finite (NaN/inf) in {str(model.dtype).removeprefix('torch.')}"
                      f"{'' if model.dtype == torch.float32 else ' and again in float32'}: no image written",
                      file=sys.stderr)
                continue
            if nsfw[k]:
                failed.append(seed)
                print(f"error: {path}: seed {seed}: the safety checker flagged the image: not written", file=sys.stderr)
                continue
            path.write_bytes(guards.mark(image, a1111_parameters(dict(row, seed=seed), model.hash), path.name).png)
            print(path)
    return 1 if failed else 0


def cmd_make_smoke_model(args: argparse.Namespace) -> int:
    from sdbatch.model.weights import ModelConfig, save_random_checkpoint

    args.path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"config": ModelConfig()} if args.full_size else {}
    print(save_random_checkpoint(args.path, seed=args.seed, **kwargs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdbatch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from one prompt (text-to-image or image-to-image)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help=".safetensors / .ckpt / diffusers folder, local path or fsspec URI, or builtin:NAME "
                                     "(default: builtin:shapes, sdbatch's small built-in demo model, not Stable Diffusion)")
    gen.add_argument("-o", "--output", type=Path, required=True,
                     help="output .png; with --num-images N > 1: OUT-0.png ... OUT-{N-1}.png")
    gen.add_argument("--negative", default="", help="negative prompt (default: none, the empty string)")
    gen.add_argument("--seed", type=_seed, default=None, help="seed of the first image, +1 per next image (default: random)")
    gen.add_argument("--steps", type=_positive_int, default=25)
    gen.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance scale; 1 turns it off")
    gen.add_argument("--sampler", choices=list(SAMPLERS), default="dpmpp_2m_karras")
    gen.add_argument("--width", type=_multiple_of_8, help="default: the model's native size (64 for builtin:shapes, "
                     "the --resolution it was trained at for a model sdbatch trained, else SD v1.x's 512)")
    gen.add_argument("--height", type=_multiple_of_8, help="default: as --width")
    gen.add_argument("--init-image", type=Path, help="image-to-image: start from this image (resized to the size)")
    gen.add_argument("--strength", type=_strength, default=0.8, help="image-to-image: how much to change, in (0, 1]")
    gen.add_argument("--num-images", type=_positive_int, default=1)
    gen.add_argument("--batch-size", type=_positive_int, default=1, help="images generated together")
    gen.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="auto: float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16, else float32")
    gen.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:1, mps, ...")
    gen.add_argument("--no-ema", dest="ema", action="store_false",
                     help="a full checkpoint's raw U-Net weights, not its EMA weights (the default); "
                          "diffusers and AUTOMATIC1111 use the raw ones")
    add_safeguard_arguments(gen)
    gen.set_defaults(handler=cmd_generate)

    smoke = sub.add_parser("make-smoke-model", help="write a random-weight SD v1.x checkpoint (tiny unless --full-size)")
    smoke.add_argument("path", type=Path, help="output .safetensors or .ckpt")
    smoke.add_argument("--seed", type=int, default=0)
    smoke.add_argument("--full-size", action="store_true", help="SD1.5's size (about 4 GB in float32)")
    smoke.set_defaults(handler=cmd_make_smoke_model)

    from sdbatch.serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seed", 0) is None:
        args.seed = random.randrange(2**32)
    try:
        return args.handler(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        return report_missing_extra(e, f"python -m sdbatch {args.command}")


if __name__ == "__main__":
    exit_without_teardown(main())
