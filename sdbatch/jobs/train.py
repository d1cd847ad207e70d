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

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from sdbatch import storage
from sdbatch.errors import JobError
from sdbatch.jobs.common import actor_pool, now, ray_session, versions
from sdbatch.jobs.output import Output

PARTS = ("unet", "text_encoder", "vae")
MAX_GRAD_NORM = 1.0        # diffusers' train_text_to_image.py
WEIGHT_DECAY = 1e-2        # AdamW, as diffusers' train_text_to_image.py
KL_WEIGHT = 1e-6           # LDM's autoencoder config (kl_weight 1e-6)
MAX_FAILURES = 3           # worker failures Ray Train recovers from, from the latest checkpoint
DATA_CPUS = 0.5            # CPUs left to Ray Data's decoding beside the training workers
SAMPLE_STEPS, SAMPLE_SAMPLER, SAMPLE_CFG = 20, "dpmpp_2m_karras", 7.5
RUN_NAME = "checkpoints"   # Ray Train's run folder in OUT
LOG_EVERY_S = 10.0         # progress lines in a log (0.5 s on a terminal)


# ----------------------------------------------------------------------------- settings


def parse_parts(value: str) -> list[str]:
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
    if args.learning_rate <= 0 or args.warmup_steps < 0:
        raise JobError("--learning-rate must be positive and --warmup-steps not negative")
    return dict(
        data=args.data, caption_column=args.caption_column, init=args.init, config=args.config, parts=parts,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, resolution=args.resolution,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, seed=args.seed,
        checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay,
        caption_dropout=args.caption_dropout, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
        random_crop=args.random_crop, flip=args.flip, validation_prompts=read_prompts(args.validation_prompts))


# ----------------------------------------------------------------------------- the model being trained


def build_model(settings: dict[str, Any]):
    """(model, trained): the StableDiffusion to train (float32, CPU) and a ModuleDict of its
    trained parts, the only parameters that require gradients."""
    from torch import nn

    from sdbatch.model.training import load_for_training, new_model

    if settings["init"]:
        model = load_for_training(settings["init"])
    else:
        model = new_model(settings["config"], settings["seed"])
    model.requires_grad_(False).eval()
    trained = nn.ModuleDict({p: getattr(model, p) for p in settings["parts"]})
    trained.requires_grad_(True).train()
    return model, trained


def worker_seed(seed: int, rank: int) -> int:
    """The seed of a worker's generator: sha256("<--seed>:train:<rank>"), first 8 bytes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:train:{rank}".encode()).digest()[:8], "big")


def _objective():
    import torch
    from torch import nn

    from sdbatch.model import training

    class Objective(nn.Module):
        """The loss of one batch. A module, so that DDP can wrap it: its parameters that
        require gradients are the trained parts'."""

        def __init__(self, model, settings: dict[str, Any]):
            super().__init__()
            self.model, self.settings = model, settings

        def forward(self, images: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
            m, s = self.model, self.settings
            if s["parts"] == ["vae"]:
                return training.vae_loss(m.vae, images, generator, KL_WEIGHT)[0]
            latents = training.encode_latents(m.vae, images, generator, m.config.latent_scale)
            tokens = training.tokenize_captions(m.tokenize, captions, generator, s["caption_dropout"])
            with torch.set_grad_enabled("text_encoder" in s["parts"]):
                context = m.text_encoder(tokens.to(images.device))
            return training.diffusion_loss(m.unet, latents, context, generator, s["snr_gamma"], s["noise_offset"])

    return Objective


def checkpoint_unet_blocks(unet) -> None:
    """Gradient checkpointing: each U-Net block recomputes its activations in the backward pass."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- on each worker


class Run:
    """One worker's training state: model, optimizer, EMA, generator, data position, log."""

    def __init__(self, cfg: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch

        from sdbatch.jobs.train_data import SampleStream
        from sdbatch.model.training import EMA

        torch.set_num_threads(cfg["threads"])
        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.model, self.trained = build_model(cfg)
        self.model.to(self.device)
        self.params = list(self.trained.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg["learning_rate"], weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["mixed_precision"] == "fp16")
        self.ema = EMA(self.trained, cfg["ema_decay"])
        self.generator = torch.Generator().manual_seed(worker_seed(cfg["seed"], self.rank))
        self.step, self.log = 0, []
        epoch = position = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            epoch, position = self.restore(checkpoint)
        if cfg["gradient_checkpointing"] and "unet" in cfg["parts"]:
            checkpoint_unet_blocks(self.model.unet)
        self.objective = ray.train.torch.prepare_model(_objective()(self.model, cfg), move_to_device=False)
        self.stream = SampleStream(ray.train.get_dataset_shard("train"), epoch, position)
        self.out = Output(cfg["output"])

    def restore(self, checkpoint) -> tuple[int, int]:
        import torch

        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
            mine = os.path.join(folder, f"rank-{self.rank}.pt")
            own = torch.load(mine, weights_only=True) if os.path.exists(mine) else None
        self.trained.load_state_dict(state["trained"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.log = state["step"], state["log"]
        if own is None:  # more workers than before: a fresh generator, the data from the start of an epoch
            self.generator.manual_seed(worker_seed(self.cfg["seed"] + self.step, self.rank))
            return state["epoch"], 0
        self.generator.set_state(own["generator"])
        if self.rank == 0:
            print(f"resumed from the checkpoint of step {self.step}", file=sys.stderr)
        return own["epoch"], own["position"]

    def train(self) -> None:
        import torch

        from sdbatch.jobs.train_data import make_batch

        cfg = self.cfg
        accum, n = cfg["grad_accum"], cfg["batch_size"]
        progress = TrainProgress(cfg["steps"], self.step, n * accum * self.world) if self.rank == 0 else None
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16 if cfg["mixed_precision"] == "bf16" else torch.float16,
                                  enabled=cfg["mixed_precision"] != "no")
        while self.step < cfg["steps"]:
            start = time.perf_counter()
            lr = cfg["learning_rate"] * min(1.0, (self.step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["learning_rate"]
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64)
            for micro in range(accum):
                rows = self.stream.take(n)
                images = make_batch(rows, cfg["resolution"], cfg["random_crop"], cfg["flip"], self.generator).to(self.device)
                last = micro == accum - 1
                sync = contextlib.nullcontext() if last or self.world == 1 else self.objective.no_sync()
                with sync:
                    with autocast:
                        loss = self.objective(images, [str(r["caption"]) for r in rows], self.generator)
                    self.scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().double().cpu() / accum
            loss_value = self.mean_over_workers(loss_sum)
            if not math.isfinite(loss_value):
                self.stop(loss_value)
                return
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.trained)
            self.step += 1
            seconds = time.perf_counter() - start
            self.log.append(dict(step=self.step, loss=loss_value, learning_rate=lr, grad_norm=grad_norm,
                                 samples_per_s=n * accum * self.world / seconds, wall_s=seconds,
                                 time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")))
            if progress:
                progress.update(self.step, loss_value)
            if self.step % cfg["checkpoint_every"] == 0 or self.step == cfg["steps"]:
                self.save()
        if progress:
            progress.close()

    def mean_over_workers(self, value) -> float:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(value)
            value = value / self.world
        return float(value)

    def stop(self, loss: float) -> None:
        """A non-finite loss: nothing of this step is applied; the last checkpoint stays the latest."""
        if self.rank == 0:
            message = (f"the loss became {loss} at step {self.step + 1}; training stopped. The last good "
                       f"checkpoint (step {self.step - self.step % self.cfg['checkpoint_every']}) is in "
                       f"{self.out.uri_of(RUN_NAME)}: lower --learning-rate, or check the data")
            storage.write_bytes(self.out.fs, self.out.path("stopped.json"),
                                json.dumps(dict(step=self.step + 1, loss=str(loss), error=message)).encode())

    def save(self) -> None:
        """A checkpoint through Ray Train (every worker adds its own file), the train log and
        the validation samples."""
        import ray.train
        import torch

        with tempfile.TemporaryDirectory() as folder:
            torch.save(dict(generator=self.generator.get_state(), epoch=self.stream.epoch,
                            position=self.stream.position), os.path.join(folder, f"rank-{self.rank}.pt"))
            if self.rank == 0:
                torch.save(dict(step=self.step, epoch=self.stream.epoch, trained=self.trained.state_dict(),
                                ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                                scaler=self.scaler.state_dict(), log=self.log),
                           os.path.join(folder, "state.pt"))
                self.write_log()
                if self.cfg["validation_prompts"] and self.cfg["parts"] != ["vae"]:
                    self.write_samples()
            ray.train.report(dict(step=self.step, loss=self.log[-1]["loss"]),
                             checkpoint=ray.train.Checkpoint.from_directory(folder))

    def write_log(self) -> None:
        import pyarrow as pa

        storage.write_parquet(self.out.fs, self.out.path("train_log.parquet"), pa.Table.from_pylist(self.log))

    def write_samples(self) -> None:
        """OUT/samples/step-NNNNNN.png: the validation prompts from the EMA weights (training's
        own weights are put back after)."""
        import torch

        import sdbatch

        prompts = self.cfg["validation_prompts"]
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            self.ema.copy_to(self.trained)
            try:
                images = sdbatch.generate(self.model, prompts, seeds=[self.cfg["seed"] + i for i in range(len(prompts))],
                                          steps=SAMPLE_STEPS, cfg_scale=SAMPLE_CFG, sampler=SAMPLE_SAMPLER,
                                          width=self.cfg["resolution"], height=self.cfg["resolution"], progress=False)
            finally:
                for p, k in zip(self.params, kept):
                    p.copy_(k)
        storage.write_bytes(self.out.fs, self.out.path("samples", f"step-{self.step:06d}.png"), image_grid(images))


def train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train's function on each worker."""
    Run(cfg).train()


def image_grid(images, columns: int = 4) -> bytes:
    """uint8 (B, H, W, 3) -> PNG bytes of the images in rows of `columns`."""
    from PIL import Image

    b, h, w, _ = images.shape
    cols = min(columns, b)
    grid = Image.new("RGB", (cols * w, -(-b // cols) * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % cols) * w, (i // cols) * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


class TrainProgress:
    """`step k/total | loss (smoothed) | samples/s | ETA` on stderr: a line every 10 s in a log
    (0.5 s on a terminal), and at the first and last step."""

    def __init__(self, total: int, step: int, samples_per_step: int, stream=None):
        self.total, self.first, self.samples_per_step = total, step, samples_per_step
        self.stream = stream or sys.stderr
        self.every = 0.5 if self.stream.isatty() else LOG_EVERY_S
        self.start, self.last, self.smooth, self.weight, self.step = time.monotonic(), -math.inf, 0.0, 0.0, step

    def update(self, step: int, loss: float) -> None:
        self.step = step
        self.smooth, self.weight = 0.9 * self.smooth + 0.1 * loss, 0.9 * self.weight + 0.1
        if step == self.first + 1 or step == self.total or time.monotonic() - self.last >= self.every:
            self.show()

    def show(self, end: str = "") -> None:
        self.last = time.monotonic()
        done = self.step - self.first
        rate = done / max(self.last - self.start, 1e-9)
        eta = str(datetime.timedelta(seconds=round((self.total - self.step) / rate))) if rate > 0 else "?"
        line = (f"step {self.step}/{self.total} | loss {self.smooth / max(self.weight, 1e-12):.4f} | "
                f"{rate * self.samples_per_step:.2f} samples/s | ETA {eta}")
        tty = self.every < 1
        self.stream.write(("\r" + line + end) if tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.every < 1:
            self.show(end="\n")


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

    from sdbatch.jobs.train_data import training_dataset

    n, resources, threads = pool
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
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
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)


def export_model(settings: dict[str, Any], state: dict[str, Any], out: Output) -> str:
    """OUT/model.safetensors from the checkpoint's EMA; returns its sha256."""
    from sdbatch.model.training import EMA, export_checkpoint

    model, trained = build_model(settings)
    ema = EMA(trained)
    ema.load_state_dict(state["ema"])
    ema.copy_to(trained)
    base = model.hash if settings["init"] else f"new {settings['config']} model, seed {settings['seed']}"
    metadata = {"sdbatch.base_model": base, "sdbatch.steps": str(state["step"]), "sdbatch.data": settings["data"],
                "sdbatch.parts": ",".join(settings["parts"]),
                "sdbatch.settings": json.dumps({k: v for k, v in settings.items() if k != "validation_prompts"})}
    return export_checkpoint(model, out.uri_of("model.safetensors"), metadata)


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


def train_command(args) -> int:
    from sdbatch.jobs.train_data import plan_row_groups

    settings = train_settings(args)
    groups, rows = plan_row_groups(args.data, args.caption_column)
    out = Output(args.output)
    record_path = out.path("train.json")
    previous = json.loads(storage.read_bytes(out.fs, record_path)) if storage.exists(out.fs, record_path) else None
    if previous and previous["settings"] != settings and not args.overwrite:
        diff = ", ".join(f"{k} {previous['settings'].get(k)!r} -> {v!r}"
                         for k, v in settings.items() if previous["settings"].get(k) != v)
        raise JobError(f"{out.uri} holds a training run with other settings ({diff}); use another --output, "
                       f"or --overwrite to delete its checkpoints and outputs and start again")
    if args.overwrite:
        for name in TRAIN_OUTPUTS:
            storage.remove(out.fs, out.path(name))
        previous = None
    if previous and previous.get("finished") and storage.exists(out.fs, out.path("model.safetensors")):
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
    from sdbatch.jobs.cli import _workers

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
    p.add_argument("--workers", type=_workers, default=None, help="N or 'auto' (default: one per GPU, or 1 on CPU)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="(default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute (U-Net)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="(default: %(default)s)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of captions replaced by '' (SD v1.5's 0.1 makes guidance work; default: %(default)s)")
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR loss weighting, e.g. 5 (default: off)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="e.g. 0.05 (default: %(default)s)")
    p.add_argument("--random-crop", action="store_true", help="crop at random offsets (default: the centre)")
    p.add_argument("--flip", action="store_true", help="flip half the images left-right")
    p.add_argument("--validation-prompts", metavar="FILE", help="one prompt a line: a grid of images at each checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete OUT's checkpoints and outputs first")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=train_command)
