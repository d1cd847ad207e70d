"""VAE decode/encode and the CLIP text encoder at full SD1.5 size: sdbatch against diffusers /
transformers on the same random weights, plus the peak memory of loading a full checkpoint.

Both sides run in this process, same dtype and thread count, alternating; each timing is the
median of --runs runs after one warm-up. Wall time and process CPU time are both reported (on a
shared machine the CPU-time ratio is the steadier one). Loading memory: a full-size fp32
checkpoint is written to a temporary file and loaded by a fresh process, which then reads
every weight (a .ckpt stays memory-mapped); its peak RSS, import overhead included, is compared
with the size of the weights (target <= 1.3). Full size needs several GiB: on a shared
machine take the benchmark lock:

    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_model.py
    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_model.py --dtype bf16 --only vae_decode
"""

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdbatch.model.clip import CLIPTextEncoder, clip_config_from_diffusers, clip_state_dict_from_diffusers
from sdbatch.model.layers import pack_for_cpu
from sdbatch.model.tokenizer import Tokenizer
from sdbatch.model.vae import AutoencoderKL, vae_config_from_diffusers, vae_state_dict_from_diffusers
from sdbatch.model.weights import load_component_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import diffusers_components  # noqa: E402  (the SD1.5-size random components)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = ("vae_decode", "vae_encode", "text_encoder")

# peak RSS from VmHWM: ru_maxrss would include the parent's peak, which survives fork and exec
LOAD_SCRIPT = """
import re, sys, time, torch, sdbatch
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
base = peak()
start = time.perf_counter()
model = sdbatch.load_model(sys.argv[1])
elapsed = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
for t in model.state_dict().values():  # fault in memory-mapped (.ckpt) weights, as running the model does
    t.sum()
print(weights, base, peak(), elapsed)
"""


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(dtype: torch.dtype) -> dict:
    """{case: (diffusers callable, sdbatch callable)} on one set of random weights."""
    ref = diffusers_components("full", names=("vae", "text_encoder"))
    vae_ref, text_ref = ref["vae"].to(dtype), ref["text_encoder"].to(dtype)
    with torch.device("meta"):
        vae = AutoencoderKL(vae_config_from_diffusers(dict(vae_ref.config)))
        text = CLIPTextEncoder(clip_config_from_diffusers(text_ref.config.to_dict()))
    cpu = torch.device("cpu")
    load_component_(vae, "vae", vae_state_dict_from_diffusers(vae_ref.state_dict()), "diffusers", cpu, dtype)
    load_component_(text, "text_encoder", clip_state_dict_from_diffusers(text_ref.state_dict()), "diffusers", cpu, dtype)
    pack_for_cpu(vae), pack_for_cpu(text)  # as load_model does on CPU

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 64, 64, generator=gen).to(dtype)
    images = (torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1).to(dtype)
    tokens = Tokenizer()(["a photograph of an astronaut riding a horse", ""])
    return {
        "vae_decode": (lambda: vae_ref.decode(latents).sample, lambda: vae.decode(latents)),
        "vae_encode": (lambda: vae_ref.encode(images).latent_dist.mean, lambda: vae.encode(images)[0]),
        "text_encoder": (lambda: text_ref(tokens).last_hidden_state, lambda: text(tokens)),
    }


def timed(fn) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


@torch.no_grad()
def bench(name: str, dtype: torch.dtype, cases: list[str], runs: int) -> None:
    fns = build(dtype)
    print(f"\n{name}: built (peak RSS so far {peak_rss_gib():.2f} GiB)", flush=True)
    print(f"{'case':<14}{'diffusers s':>12}{'sdbatch s':>11}{'ratio':>7}{'cpu ratio':>11}{'max |diff|':>12}{'peak GiB':>10}")
    for case in cases:
        ref_fn, our_fn = fns[case]
        _, _, expected = timed(ref_fn)
        _, _, out = timed(our_fn)
        diff = (out.float() - expected.float()).abs().max().item()
        ref_t, our_t = [], []
        for _ in range(runs):
            ref_t.append(timed(ref_fn)[:2])
            our_t.append(timed(our_fn)[:2])
        rw, rc = (statistics.median(x) for x in zip(*ref_t))
        ow, oc = (statistics.median(x) for x in zip(*our_t))
        print(f"{case:<14}{rw:>12.3f}{ow:>11.3f}{ow / rw:>7.2f}{oc / rc:>11.2f}{diff:>12.2e}{peak_rss_gib():>10.2f}", flush=True)


def bench_loading(formats: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        path = Path(tmp) / "sd15.safetensors"
        # written by a child process so this one stays small
        subprocess.run(
            [sys.executable, "-c", "import sys; from sdbatch.model.weights import ModelConfig, save_random_checkpoint; "
             "save_random_checkpoint(sys.argv[1], config=ModelConfig())", str(path)],
            check=True,
        )
        if "ckpt" in formats:
            subprocess.run(
                [sys.executable, "-c", "import sys, pathlib; from sdbatch.model.weights import read_safetensors, save_checkpoint; "
                 "save_checkpoint(read_safetensors(pathlib.Path(sys.argv[1])), sys.argv[2])",
                 str(path), str(path.with_suffix(".ckpt"))],
                check=True,
            )
        print("\nloading a full-size fp32 checkpoint in a fresh process (target: peak RSS / weights <= 1.3)")
        print(f"{'format':<13}{'weights GiB':>12}{'after import':>13}{'peak GiB':>10}{'peak/weights':>14}{'seconds':>9}")
        for fmt in formats:
            out = subprocess.run(
                [sys.executable, "-c", LOAD_SCRIPT, str(path.with_suffix("." + fmt))],
                check=True, capture_output=True, text=True,
            ).stdout.split()
            weights, base, peak, seconds = int(out[0]), int(out[1]), int(out[2]), float(out[3])
            print(f"{fmt:<13}{weights / 2**30:>12.2f}{base / 2**30:>13.2f}{peak / 2**30:>10.2f}"
                  f"{peak / weights:>14.2f}{seconds:>9.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--only", nargs="+", default=list(CASES) + ["load"], choices=list(CASES) + ["load"])
    parser.add_argument("--formats", nargs="+", default=["safetensors", "ckpt"], choices=["safetensors", "ckpt"])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; VAE decode 1x4x64x64, encode 1x3x512x512, text 2x77")
    cases = [c for c in CASES if c in args.only]
    if cases:
        for name in args.dtype:
            bench(name, DTYPES[name], cases, args.runs)
    if "load" in args.only:
        bench_loading(args.formats)


if __name__ == "__main__":
    main()
