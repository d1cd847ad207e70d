"""The jobs' command line.

    python -m sdbatch.jobs run PROMPTS [--model SRC] --output OUT [options]
    python -m sdbatch.jobs plan PROMPTS [--model SRC] --output OUT [run's options]
    python -m sdbatch.jobs status OUT
    python -m sdbatch.jobs metrics OUT --reference REF
    python -m sdbatch.jobs report OUT
    python -m sdbatch.jobs train DATA --output OUT (--init SRC | --config NAME) [options]
"""

from __future__ import annotations

import argparse
import sys

from sdbatch.errors import JobError
from sdbatch.extras import report_missing_extra
from sdbatch.jobs.common import workers_option
from sdbatch.jobs.generate import plan_command, run_command, status_command
from sdbatch.jobs.plan import DEFAULTS
from sdbatch.jobs.report import add_report_arguments
from sdbatch.jobs.train import add_train_arguments
from sdbatch.safeguards import add_arguments as add_safeguard_arguments


def add_run_arguments(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `run`, which `plan` takes too."""
    run.add_argument("prompts", help="Parquet file, folder or glob; local or fsspec URI (s3://...)")
    run.add_argument("--model", help="checkpoint (.safetensors/.ckpt) or diffusers folder; path or URI; or builtin:NAME "
                     "(default: builtin:shapes, sdbatch's small built-in demo model, not Stable Diffusion)")
    run.add_argument("--output", required=True, help="output folder; path or URI")
    run.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="sampling steps (default: %(default)s)")
    run.add_argument("--cfg-scale", type=float, default=DEFAULTS["cfg_scale"], help="guidance scale (default: %(default)s)")
    run.add_argument("--sampler", default=DEFAULTS["sampler"],
                     help="ddpm, ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras (default: %(default)s)")
    run.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size: 64 for builtin:shapes, "
                     "the --resolution it was trained at for a model sdbatch trained, else 512)")
    run.add_argument("--height", type=int, help="multiple of 8 (default: as --width)")
    run.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                     help="base of the seeds of rows without a seed (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=4, help="images per model call (default: %(default)s)")
    run.add_argument("--workers", type=workers_option, default=None,
                     help="actors: N, or 'auto' to scale with the cluster (default: one per GPU, or 1 on CPU)")
    run.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto: float16 on CUDA, bfloat16 on CPUs with fast bf16, else float32")
    run.add_argument("--no-ema", dest="ema", action="store_false",
                     help="a full checkpoint's raw U-Net weights instead of its EMA weights (the default); "
                          "diffusers and AUTOMATIC1111 use the raw ones")
    run.add_argument("--overwrite", action="store_true",
                     help="delete OUT's previous outputs first (plan: plan as if OUT were empty)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--metrics", action="store_true",
                     help="end with FID/IS/KID against --reference (OUT/metrics.json), taking each new "
                          "image's Inception features while it is in memory")
    run.add_argument("--reference", metavar="REF", help="with --metrics: reference images or .npz statistics, "
                     "as for the metrics command")
    run.add_argument("--inception-weights", metavar="PATH", help="with --metrics: as for the metrics command")
    add_safeguard_arguments(run)
    return run


def build_parser(with_metrics: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdbatch.jobs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, handler, what in (("run", run_command, "generate the images of a prompt table"),
                                ("plan", plan_command, "print what run would do with the same options (images done, "
                                                       "failed and to generate, batches by shape); starts nothing")):
        add_run_arguments(sub.add_parser(name, help=what)).set_defaults(handler=handler)

    status = sub.add_parser("status", help="count done, errored and remaining rows of OUT")
    status.add_argument("output")
    status.set_defaults(handler=status_command)

    train = sub.add_parser("train", help="fine-tune or train a model on image-caption tables (Ray Train)")
    add_train_arguments(train)

    report = sub.add_parser("report", help="OUT/report.html: one self-contained page of a run's images, "
                            "settings, times and latent space (or a training run's loss and samples)")
    add_report_arguments(report)  # plotly, jinja2 and scikit-learn (the report extra) load when it runs

    metrics = sub.add_parser("metrics", help="FID / IS / KID of generated images")
    metrics.set_defaults(handler=None)
    if with_metrics:  # imported only when asked for: `run` needs none of the metrics extra
        from sdbatch.jobs.metrics import add_metrics_arguments, metrics_command

        add_metrics_arguments(metrics)
        metrics.set_defaults(handler=metrics_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_metrics=argv[:1] == ["metrics"]).parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `run` reports what it recorded itself; here nothing had started
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        return report_missing_extra(exc, f"python -m sdbatch.jobs {args.command}")


if __name__ == "__main__":
    sys.exit(main())
