"""The training job's side on each Ray Train worker: the model and its trained parts, the loss
as a DDP-wrappable module, and `Run`, one worker's training state from start or checkpoint to
the last step (see `sdbatch.jobs.train` for the job as a whole).

Every random draw (crops, flips, caption dropout, VAE posterior noise, diffusion noise and
timesteps) comes from the worker's generator, seeded from --seed and its rank; the generator's
state and the data position go into every checkpoint, with the weights, EMA and optimizer.
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
from sdbatch.jobs.output import Output

MAX_GRAD_NORM = 1.0        # diffusers' train_text_to_image.py
WEIGHT_DECAY = 1e-2        # AdamW, as diffusers' train_text_to_image.py
KL_WEIGHT = 1e-6           # LDM's autoencoder config (kl_weight 1e-6)
SAMPLE_STEPS, SAMPLE_SAMPLER, SAMPLE_CFG = 20, "dpmpp_2m_karras", 7.5  # validation images
RUN_NAME = "checkpoints"   # Ray Train's run folder in OUT
LOG_EVERY_S = 10.0         # progress lines in a log (0.5 s on a terminal)


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
            self.cache = training.PosteriorCache() if settings.get("cache_latents") else None

        def forward(self, images: torch.Tensor, captions: list[str], generator: torch.Generator,
                    rows: list[int]) -> torch.Tensor:
            m, s = self.model, self.settings
            if s["parts"] == ["vae"]:
                return training.vae_loss(m.vae, images, generator, KL_WEIGHT)[0]
            moments = self.cache.encode(m.vae, images, rows) if self.cache else m.vae.encode(images)
            latents = training.sample_latents(*moments, generator, m.config.latent_scale)
            tokens = training.tokenize_captions(m.tokenize, captions, generator, s["caption_dropout"])
            with torch.set_grad_enabled("text_encoder" in s["parts"]):
                context = m.text_encoder(tokens.to(images.device))
            return training.diffusion_loss(m.unet, latents, context, generator, s["snr_gamma"], s["noise_offset"])

    return Objective


# ----------------------------------------------------------------------------- on each worker


class Run:
    """One worker's training state: model, optimizer, EMA, generator, data position, log."""

    def __init__(self, cfg: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch

        from sdbatch.jobs.train_data import SampleStream
        from sdbatch.model.training import EMA, gradient_checkpointing_

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
            gradient_checkpointing_(self.model.unet)
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
        """Steps until --steps: checkpoints every --checkpoint-every steps and at the end; stops
        early, with no checkpoint, at a non-finite loss."""
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
                        loss = self.objective(images, [str(r["caption"]) for r in rows], self.generator,
                                              [int(r["row"]) for r in rows])
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
