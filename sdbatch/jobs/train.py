"""The training job: fine-tune an SD v1.x checkpoint, or train a new model, on image-caption tables.

    python -m sdbatch.jobs train DATA --output OUT (--init SRC | --config NAME) [options]

The driver checks the tables and OUT, then runs `train_loop` on Ray Train workers (TorchTrainer:
DDP over gloo on CPUs, NCCL on GPUs) fed by a Ray Data stream (`sdbatch.jobs.train_data`). The
losses, EMA and export are `sdbatch.model.training`'s. At the end the driver writes the model
from the last checkpoint. OUT holds:

    train.json          settings (a re-run with others is refused unless --overwrite), versions, times
    checkpoints/        Ray Train's run folder: checkpoint_*/state.pt (trained weights, EMA,
                        optimizer, step, log) and rank-N.pt (each worker's generator and data position)
    model.safetensors   one LDM-layout file: trained parts from the EMA, the rest as loaded
    train_log.parquet   step, loss, learning_rate, grad_norm, samples_per_s, wall_s, up to the last checkpoint
    loss.png            the loss curve
    samples/step-NNNNNN.png   --validation-prompts images at each checkpoint (EMA weights)
    errors/*.parquet    rows left out: unreadable image or null caption, with a sentence why

Running the same command again resumes from the latest checkpoint (Ray Train finds it in
OUT/checkpoints); a worker that dies is replaced and the run goes on from there (FailureConfig).
With one worker in float32 a resumed run ends with exactly the weights of an uninterrupted one:
every random draw comes from a generator whose state is checkpointed, and the data is read in
table order, resuming at the recorded position.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from sdbatch import storage
from sdbatch.errors import JobError
from sdbatch.jobs.common import actor_pool, check_model, now, ray_session, versions, workers_option
from sdbatch.jobs.output import Output
from sdbatch.jobs.train_worker import RUN_NAME, build_model, train_loop

PARTS = ("unet", "text_encoder", "vae")
MAX_FAILURES = 3           # worker failures Ray Train recovers from, from the latest checkpoint
CALIBRATION_IMAGES = 256  # a VAE's latent scale is measured on this many images of the data
DATA_CPUS = 0.5            # CPUs left to Ray Data's decoding beside the training workers


# ----------------------------------------------------------------------------- settings


def parse_parts(value: str) -> list[str]:
    """--parts -> the parts that train, in PARTS order; ValueError for other combinations."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts == ["vae"]:
        return parts
    if not parts or any(p not in ("unet", "text_encoder") for p in parts):
        raise ValueError(f"--parts {value!r}: use 'vae' alone, or 'unet' and/or 'text_encoder'")
    return sorted(set(parts), key=PARTS.index)


def read_prompts(uri: str | None) -> list[str]:
    """The non-empty lines of a --validation-prompts file (local path or URI)."""
    if uri is None:
        return []
    fs, path = storage.url_to_fs(uri)
    try:
        text = storage.read_bytes(fs, path).decode()
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise JobError(f"--validation-prompts {uri}: cannot read the prompts ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def absolute(uri: str) -> str:
    """A local path made absolute (workers run in other folders); other URIs as they are."""
    fs, path = storage.url_to_fs(uri)
    return storage.to_uri(fs, path)


def train_settings(args) -> dict[str, Any]:
    """What the trained weights depend on: a re-run into OUT must give the same."""
    from sdbatch.model.training import CONFIGS

    if (args.init is None) == (args.config is None):
        raise JobError("give exactly one of --init SRC (fine-tune a checkpoint) or --config NAME (a new model)")
    if args.config is not None and args.config not in CONFIGS:
        raise JobError(f"--config {args.config!r} is unknown; use one of {', '.join(CONFIGS)}")
    try:
        parts = parse_parts(args.parts)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1")
    if args.resolution < 8 or args.resolution % 8:
        raise JobError(f"--resolution {args.resolution} is not a positive multiple of 8")
    if not 0 <= args.caption_dropout <= 1 or not 0 <= args.ema_decay < 1:
        raise JobError("--caption-dropout must be in [0, 1] and --ema-decay in [0, 1)")
    if args.cache_latents and ("vae" in parts or args.random_crop or args.flip):
        raise JobError("--cache-latents needs a frozen VAE and the same pixels every epoch: it cannot go with "
                       "--parts vae, --random-crop or --flip")
    if args.learning_rate <= 0 or args.warmup_steps < 0:
        raise JobError("--learning-rate must be positive and --warmup-steps not negative")
    return dict(
        data=args.data, caption_column=args.caption_column,
        init=args.init and check_model(args.init, "--init")[0],
        config=args.config, parts=parts,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, resolution=args.resolution,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, seed=args.seed,
        checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay,
        caption_dropout=args.caption_dropout, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
        random_crop=args.random_crop, flip=args.flip, cache_latents=args.cache_latents, validation_prompts=read_prompts(args.validation_prompts))


# ----------------------------------------------------------------------------- the driver


def ray_storage(out: Output):
    """(storage_path, storage_filesystem) for Ray Train: OUT's filesystem as a pyarrow one."""
    if storage.to_uri(out.fs, out.root) == out.root:  # a local path
        return out.root, None
    import pyarrow.fs

    return out.root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(out.fs))


def worker_pool(workers: str | None, mixed_precision: str) -> tuple[int, dict[str, float], int]:
    """(training workers, Ray resources of each, torch threads of each), from the cluster as for
    `jobs run`: one worker per GPU, or CPU workers whose threads add up to the cores."""
    pool = actor_pool(workers, None)
    n = pool.max_size if workers == "auto" and pool.max_size else pool.min_size
    if mixed_precision == "fp16" and not pool.num_gpus:
        raise JobError("--mixed-precision fp16 needs GPUs; on CPUs use bf16 or no")
    if pool.num_gpus:
        resources = {"CPU": 1, "GPU": pool.num_gpus}
    else:  # the workers' threads take the cores; Ray Data decodes beside them
        resources = {"CPU": max(0.1, pool.num_cpus - DATA_CPUS / n)}
    # OMP_NUM_THREADS, when the driver has it, caps each worker's threads (e.g. on a busy machine)
    return n, resources, min(pool.threads, int(os.environ.get("OMP_NUM_THREADS") or pool.threads))


def fit(settings: dict[str, Any], out: Output, groups: list[dict[str, Any]], rows: int,
        pool: tuple[int, dict[str, float], int]):
    """Runs train_loop on Ray Train; returns its Result (the latest checkpoint in .checkpoint)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from sdbatch.jobs.pacing import PacedSchedulingLoop
    from sdbatch.jobs.train_data import training_dataset

    n, resources, threads = pool
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if PacedSchedulingLoop not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(PacedSchedulingLoop)
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True  # table order: what makes a resumed run read what an uninterrupted one reads
    path, filesystem = ray_storage(out)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(settings, output=out.uri, threads=threads),
        scaling_config=ray.train.ScalingConfig(num_workers=n, use_gpu="GPU" in resources, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env} if env else None),
        datasets={"train": training_dataset(groups, rows, n * settings["steps"] * settings["batch_size"] * settings["grad_accum"],
                                            out.uri, settings["resolution"], settings["caption_column"], DATA_CPUS / 2, env)},
        dataset_config=ray.train.DataConfig(execution_options=options),
    )
    return trainer.fit()


def load_state(checkpoint) -> dict[str, Any]:
    """A Ray Train checkpoint's state.pt (tensors and numbers only: loaded with weights_only)."""
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)


def export_model(settings: dict[str, Any], state: dict[str, Any], out: Output) -> str:
    """OUT/model.safetensors from the checkpoint's EMA; returns its sha256. A VAE trained alone
    has its latent space calibrated first (`calibrate_latent_scale_`, on CALIBRATION_IMAGES of
    the data), so that the U-Net trained on it next sees unit-variance latents."""
    import torch

    from sdbatch.model.training import EMA, calibrate_latent_scale_, export_checkpoint

    model, trained = build_model(settings)
    ema = EMA(trained)
    ema.load_state_dict(state["ema"])
    ema.copy_to(trained)
    base = model.hash if settings["init"] else f"new {settings['config']} model, seed {settings['seed']}"
    extra = {}
    if settings["parts"] == ["vae"]:
        k = calibrate_latent_scale_(model.vae, calibration_images(settings), torch.Generator().manual_seed(settings["seed"]),
                                    model.config.latent_scale)
        extra["sdbatch.latent_rescale"] = f"{k:.6g}"
    metadata = {**extra, "sdbatch.base_model": base, "sdbatch.steps": str(state["step"]), "sdbatch.data": settings["data"],
                "sdbatch.parts": ",".join(settings["parts"]),
                "sdbatch.settings": json.dumps({k: v for k, v in settings.items() if k != "validation_prompts"})}
    return export_checkpoint(model, out.uri_of("model.safetensors"), metadata)


def calibration_images(settings: dict[str, Any]):
    """The first CALIBRATION_IMAGES readable images of the data, centre-cropped at the training
    resolution: float32 (B, 3, R, R) in [-1, 1]."""
    import torch

    from sdbatch.jobs.train_data import decode_rows, make_batch, plan_row_groups, read_row_group

    samples = []
    for g in plan_row_groups(settings["data"], settings["caption_column"])[0]:
        samples += decode_rows(read_row_group(g["file"], g["group"]), g["first"], settings["resolution"],
                               settings["caption_column"])[0]
        if len(samples) >= CALIBRATION_IMAGES:
            break
    return make_batch(samples[:CALIBRATION_IMAGES], settings["resolution"], False, False, torch.Generator())


def plot_loss(log: list[dict[str, Any]]) -> bytes:
    """PNG bytes of the loss per step, with its moving average over ~5% of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([r["step"] for r in log])
    loss = np.array([r["loss"] for r in log])
    width = max(1, len(loss) // 20)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss")
    if width > 1:
        ax.plot(steps[width - 1:], np.convolve(loss, np.ones(width) / width, "valid"), lw=1.6,
                label=f"mean of {width} steps")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.set_yscale("log" if loss.min() > 0 else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


TRAIN_OUTPUTS = ("checkpoints", "model.safetensors", "train_log.parquet", "loss.png", "samples", "errors",
                 "stopped.json", "train.json")


def settings_change(previous: dict[str, Any], settings: dict[str, Any]) -> str:
    """The settings that differ from an OUT's earlier run ("name old -> new, ..."), or "" when it
    can go on. More --steps than before is no change: the run continues from its last checkpoint
    to the new total (the learning rate is constant after warmup, so a run extended in two goes
    takes the same steps as one run of the total)."""
    return ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in settings.items()
                     if previous.get(k) != v and not (k == "steps" and v >= previous.get(k, v + 1))
                     and (k in previous or v not in (None, False)))  # options added since: off is no change


def train_command(args) -> int:
    """`jobs train`: 0 when the model is written, 1 when a non-finite loss stopped the run;
    JobError (exit status 2) for bad arguments, tables or another run's OUT."""
    from sdbatch.jobs.train_data import plan_row_groups

    settings = train_settings(args)
    groups, rows = plan_row_groups(args.data, args.caption_column)
    out = Output(absolute(args.output))
    record_path = out.path("train.json")
    previous = json.loads(storage.read_bytes(out.fs, record_path)) if storage.exists(out.fs, record_path) else None
    diff = settings_change(previous["settings"], settings) if previous else ""
    if diff and not args.overwrite:
        raise JobError(f"{out.uri} holds a training run with other settings ({diff}); use another --output, "
                       f"or --overwrite to delete its checkpoints and outputs and start again")
    if args.overwrite:
        for name in TRAIN_OUTPUTS:
            storage.remove(out.fs, out.path(name))
        previous = None
    if (previous and previous.get("finished") and previous["settings"]["steps"] == settings["steps"]
            and storage.exists(out.fs, out.path("model.safetensors"))):
        print(f"{out.uri} already holds the trained model: nothing to do", file=sys.stderr)
        return 0
    if settings["validation_prompts"] and settings["parts"] == ["vae"]:
        print("note: --validation-prompts are not used when training the VAE alone", file=sys.stderr)
    with ray_session(args.address):
        pool = worker_pool(args.workers, settings["mixed_precision"])
        storage.remove(out.fs, out.path("stopped.json"))
        record = dict(settings=settings, rows=rows, versions=versions(), finished=None,
                      started=(previous or {}).get("started") or now())
        storage.write_bytes(out.fs, record_path, json.dumps(record, indent=2).encode())
        print(f"{rows} rows; training {'+'.join(settings['parts'])} for {settings['steps']} steps on {pool[0]} "
              f"worker(s) into {out.uri}", file=sys.stderr)
        result = fit(settings, out, groups, rows, pool)
    state = load_state(result.checkpoint) if result.checkpoint else dict(step=0)
    if state["step"] < settings["steps"]:  # a non-finite loss: exit status 1, the checkpoints kept
        stopped = out.path("stopped.json")
        reason = (json.loads(storage.read_bytes(out.fs, stopped))["error"] if storage.exists(out.fs, stopped)
                  else f"training stopped at step {state['step']} of {settings['steps']}")
        print(f"error: {reason}", file=sys.stderr)
        return 1
    digest = export_model(settings, state, out)
    storage.write_bytes(out.fs, out.path("loss.png"), plot_loss(state["log"]))
    record.update(finished=now(), model_sha256=digest)
    storage.write_bytes(out.fs, record_path, json.dumps(record, indent=2).encode())
    errors = len(out.ids("errors"))
    print(f"model: {out.uri_of('model.safetensors')} (sha256 {digest[:10]}), log: {out.uri_of('train_log.parquet')}",
          file=sys.stderr)
    if errors:
        print(f"{errors} rows were left out: see {out.uri_of('errors')}", file=sys.stderr)
    return 0


def add_train_arguments(parser) -> None:
    """The `train` subcommand's arguments."""
    p = parser
    p.add_argument("data", help="Parquet image-caption tables: file, folder or glob; local or fsspec URI")
    p.add_argument("--output", required=True, help="output folder; path or URI (s3://...)")
    p.add_argument("--init", metavar="SRC", help="fine-tune this checkpoint (.safetensors/.ckpt or diffusers folder)")
    p.add_argument("--config", metavar="NAME", help="train a new model of this size (tiny, sd15)")
    p.add_argument("--parts", default="unet", help="what trains: unet, text_encoder, both (comma-separated), "
                   "or vae alone (default: %(default)s)")
    p.add_argument("--caption-column", default="text", help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images per worker per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=512, help="square training size in pixels (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW's, after warmup (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights of a new model, noise, crops, flips, dropout (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps (default: %(default)s)")
    p.add_argument("--workers", type=workers_option, default=None, help="N or 'auto' (default: one per GPU, or 1 on CPU)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="(default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute (U-Net)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="(default: %(default)s)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of captions replaced by '' (SD v1.5's 0.1 makes guidance work; default: %(default)s)")
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR loss weighting, e.g. 5 (default: off)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="e.g. 0.05 (default: %(default)s)")
    p.add_argument("--random-crop", action="store_true", help="crop at random offsets (default: the centre)")
    p.add_argument("--flip", action="store_true", help="flip half the images left-right")
    p.add_argument("--cache-latents", action="store_true",
                   help="keep each image's VAE posterior after its first epoch (frozen VAE, no crops or flips; "
                        "a resumed run then matches an uninterrupted one up to float rounding)")
    p.add_argument("--validation-prompts", metavar="FILE", help="one prompt a line: a grid of images at each checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete OUT's checkpoints and outputs first")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=train_command)
