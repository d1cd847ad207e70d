"""Training-step throughput: sdbatch's step against a plain diffusers step, in one run.

Both train the same U-Net weights (diffusers' UNet2DConditionModel, and sdbatch's UNetModel
holding the very same parameters) with one AdamW, on the same batch of latents and text states,
in the same dtype and thread count, alternating step by step:

    sdbatch    training.diffusion_loss (noise and timesteps from a CPU generator, add_noise on
               samplers' schedule, eps MSE), backward, torch.optim.AdamW
    diffusers  torch.randn_like, torch.randint, DDPMScheduler.add_noise, unet(...).sample,
               F.mse_loss, backward, torch.optim.AdamW (examples/text_to_image/train_text_to_image.py)

bf16 runs both under torch.autocast (float32 master weights, as accelerate's mixed precision
does). Scales: tiny (the tests' U-Net, 64x64 images -> 8x8 latents, batch 2) and full (SD1.5's
860M-parameter U-Net, 256x256 images -> 32x32 latents, batch 1). Throughput is the median step
time over --runs alternated steps; the ratio is sdbatch's step time over diffusers' (as in
the README's table: below 1, sdbatch is faster); on a busy machine time CPU seconds of one thread (--threads 1 --cpu-time). Peak
memory of each side is measured in a child process that builds only that side (max RSS on CPU,
torch.cuda.max_memory_allocated on CUDA). Full size needs about 16 GiB of RAM (weights,
gradients and AdamW state of an 860M-parameter U-Net in float32, plus activations) in the main
process and in each child; --no-memory skips the children and prints the main process's peak
instead; --no-optimizer leaves out the AdamW step (the same code and cost on both sides) and
its state, for about 8 GiB at full size. On a shared machine take the benchmark lock:

    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_train.py --scale tiny full --dtype fp32 bf16
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_unet import peak_rss_gib
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SD15_SCHEDULER, diffusers_components  # noqa: E402  (random-weight U-Nets, tiny and SD1.5 size)

from sdbatch.model.training import CONFIGS, diffusion_loss  # noqa: E402
from sdbatch.model.unet import UNetModel, unet_config_from_diffusers, unet_state_dict_from_diffusers  # noqa: E402

# scale -> image size, batch, text width, and our name of the same U-Net config
SCALES = {
    "tiny": {"size": 64, "batch": 2, "context": 128, "config": "tiny"},
    "full": {"size": 256, "batch": 1, "context": 768, "config": "sd15"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIDES = ("sdbatch", "diffusers")


def build(scale: str, device: torch.device, sides: tuple[str, ...] = SIDES) -> dict[str, torch.nn.Module]:
    """The U-Nets of `sides`, float32 in train mode. With both, they share one set of parameters
    (the same nn.Parameter objects: sdbatch's U-Net is assigned diffusers' random weights, so one
    AdamW trains both and full size fits in half the memory); alone (for its memory), sdbatch's
    is built from its config."""
    if sides == ("sdbatch",):
        return {"sdbatch": UNetModel(CONFIGS[SCALES[scale]["config"]].unet).to(device).train()}
    ref = diffusers_components(scale, names=("unet",))["unet"].to(device).train()
    if sides == ("diffusers",):
        return {"diffusers": ref}
    with torch.device("meta"):
        ours = UNetModel(unet_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(unet_state_dict_from_diffusers(ref.state_dict(keep_vars=True)), assign=True)
    return {"sdbatch": ours.train(), "diffusers": ref}


def make_steps(
    models: dict[str, torch.nn.Module], scale: str, dtype: torch.dtype, device: torch.device, batch: int,
    optimize: bool = True,
):
    """{side: one training step (a callable)} on one fixed batch, with one AdamW over the
    (shared) parameters (without `optimize`: loss and gradients only)."""
    g = torch.Generator().manual_seed(0)
    latent = SCALES[scale]["size"] // 8
    latents = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    context = torch.randn(batch, 77, SCALES[scale]["context"], generator=g).to(device)
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    params = {id(p): p for model in models.values() for p in model.parameters()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-5)  # its state is allocated on its first step

    def update() -> None:
        if optimize:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def ours() -> None:
        with autocast():
            loss = diffusion_loss(models["sdbatch"], latents, context, g)
        loss.backward()
        update()

    def theirs() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            pred = models["diffusers"](noisy, timesteps, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        update()

    return {side: step for side, step in (("sdbatch", ours), ("diffusers", theirs)) if side in models}


def timed(step, device: torch.device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def peak_gib(device: torch.device) -> float:
    """This process's peak: max RSS on CPU, the allocator's peak on CUDA (GiB)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()


def peak_memory(side: str, args, scale: str, dtype_name: str) -> float:
    """GiB at the peak of a few steps of one side alone, in a child process."""
    cmd = [sys.executable, __file__, "--only", side, "--scale", scale, "--dtype", dtype_name,
           "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def run_only(args) -> None:
    """--only SIDE: build that side alone, run 3 steps, print its peak memory as JSON."""
    device, scale, dtype = torch.device(args.device), args.scale[0], DTYPES[args.dtype[0]]
    models = build(scale, device, (args.only,))
    step = make_steps(models, scale, dtype, device, SCALES[scale]["batch"], not args.no_optimizer)[args.only]
    for _ in range(3):
        step()
    print(json.dumps({"peak_gib": peak_gib(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", nargs="+", default=["tiny"], choices=SCALES)
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=DTYPES)
    parser.add_argument("--runs", type=int, default=10, help="timed steps per side (after 2 warm-up steps each)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU seconds (busy machines, 1 thread)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-side peak memory children")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="loss and backward only, no AdamW step (its state is 2x the weights: full size in less RAM)")
    parser.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        run_only(args)
        return
    device = torch.device(args.device)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, device {device}, {args.threads} threads, {args.runs} alternated steps per side, "
          f"{'CPU' if args.cpu_time else 'wall'} time, {'no optimizer' if args.no_optimizer else 'AdamW'}")
    for scale in args.scale:
        for dtype_name in args.dtype:
            batch, size = SCALES[scale]["batch"], SCALES[scale]["size"]
            models = build(scale, device)
            steps = make_steps(models, scale, DTYPES[dtype_name], device, batch, not args.no_optimizer)
            for step in steps.values():
                for _ in range(2):  # oneDNN primitives, allocator, AdamW state
                    step()
            times: dict[str, list[float]] = {side: [] for side in steps}
            for _ in range(args.runs):
                for side, step in steps.items():
                    times[side].append(timed(step, device, clock))
            rate = {side: batch / statistics.median(t) for side, t in times.items()}
            line = (f"{scale} {dtype_name} {size}x{size} batch {batch}: diffusers {rate['diffusers']:.2f} samples/s, "
                    f"sdbatch {rate['sdbatch']:.2f} samples/s, step time sdbatch / diffusers "
                    f"{rate['diffusers'] / rate['sdbatch']:.2f}")
            del models, steps
            if args.no_memory:
                line += f"; peak memory of both (shared weights) {peak_gib(device):.2f} GiB"
            else:
                peaks = {side: peak_memory(side, args, scale, dtype_name) for side in SIDES}
                line += f"; peak memory diffusers {peaks['diffusers']:.2f} GiB, sdbatch {peaks['sdbatch']:.2f} GiB"
            print(line + "; step seconds " + json.dumps({k: [round(x, 3) for x in v] for k, v in times.items()}), flush=True)


if __name__ == "__main__":
    main()
