"""End-to-end text-to-image at full SD1.5 size: sdbatch.generate against diffusers' pipeline.

Both pipelines run on one set of random weights (our modules hold diffusers' tensors, no
copy), in the same dtype and thread count, with the same seeds and sampler, alternating.
Also: the U-Net's bfloat16 output error relative to float32, and peak memory per run.
Full size needs about 5 GiB plus activations; on a shared machine take the benchmark lock:

    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_pipeline.py            # the full table
    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_pipeline.py --quick    # 256x256, batch 1, 4 steps
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

import sdbatch
from sdbatch.model.layers import pack_for_cpu
from sdbatch.model.tokenizer import VOCAB_DIR
from sdbatch.model.weights import DIFFUSERS_COMPONENTS, ModelConfig, StableDiffusion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SD15_SCHEDULER, diffusers_components  # noqa: E402  (the SD1.5-size random components)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def ours_from(components: dict) -> StableDiffusion:
    """Our model built on the diffusers modules' own tensors, packed for the CPU as load_model does
    (which copies the convolution and linear weights)."""
    configs = {
        "unet": dict(components["unet"].config),
        "vae": dict(components["vae"].config),
        "text_encoder": components["text_encoder"].config.to_dict(),
    }
    config = ModelConfig(**{name: DIFFUSERS_COMPONENTS[name][0](cfg) for name, cfg in configs.items()})
    with torch.device("meta"):
        model = StableDiffusion(config)
    for name, module in components.items():
        getattr(model, name).load_state_dict(DIFFUSERS_COMPONENTS[name][1](module.state_dict()), assign=True)
        pack_for_cpu(getattr(model, name))
    return model.eval().requires_grad_(False)


def unet_relative_error(reference: torch.Tensor, unet, x, t, context) -> float:
    with torch.inference_mode():
        out = unet(x, t, context).float()
    return float((out - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--runs", type=int, default=1, help="timed runs per pipeline and setting")
    parser.add_argument("--quick", action="store_true", help="256x256, batch 1, 4 steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.steps = [256], [1], 4
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps dpmpp_2m_karras, cfg 7.5", flush=True)

    components = diffusers_components("full")
    tokenizer = CLIPTokenizer.from_pretrained(str(VOCAB_DIR), model_max_length=77)
    g = torch.Generator().manual_seed(0)
    probe = dict(x=torch.randn(2, 4, 32, 32, generator=g), t=torch.tensor([999.0, 500.0]),
                 context=torch.randn(2, 77, 768, generator=g))
    with torch.inference_mode():
        unet_fp32 = components["unet"](probe["x"], probe["t"], encoder_hidden_states=probe["context"]).sample
    results = {}
    for name in args.dtype:
        dtype = DTYPES[name]
        for module in components.values():
            module.to(dtype)
        model = ours_from(components)
        pipe = StableDiffusionPipeline(**components, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False,
                                       scheduler=DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True))
        pipe.set_progress_bar_config(disable=True)
        if name != "fp32":
            err = unet_relative_error(unet_fp32, model.unet, **probe)
            ref_err = unet_relative_error(
                unet_fp32, lambda x, t, c: components["unet"](x.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample, **probe
            )
            print(f"{name} U-Net output vs fp32 (256x256 latents, batch 2): relative error sdbatch {err:.2%}, diffusers {ref_err:.2%}", flush=True)
        for size in args.size:
            for batch in args.batch:
                seeds = list(range(batch))
                runs = {
                    "sdbatch": lambda: sdbatch.generate(model, [PROMPT] * batch, seeds=seeds, steps=args.steps,
                                                        width=size, height=size, progress=False),
                    "diffusers": lambda: pipe([PROMPT] * batch, num_inference_steps=args.steps, height=size, width=size,
                                              generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np"),
                }
                times = {k: [] for k in runs}
                cpu = {k: [] for k in runs}
                peaks = {k: 0.0 for k in runs}
                for i in range(args.runs):
                    for k in sorted(runs, reverse=i % 2 == 1):  # alternate which goes first
                        with torch.inference_mode(), PeakRSS() as rss:
                            start, start_cpu = time.perf_counter(), time.process_time()
                            runs[k]()
                            times[k].append(time.perf_counter() - start)
                            cpu[k].append(time.process_time() - start_cpu)
                        peaks[k] = max(peaks[k], rss.peak)
                med = {k: statistics.median(v) for k, v in times.items()}
                med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
                results[name, size, batch] = med_cpu
                # CPU time (all threads) is the fairer figure on a shared machine: wall time counts waiting
                print(f"{name} {size}x{size} batch {batch}: wall sdbatch {med['sdbatch']:.1f}s diffusers {med['diffusers']:.1f}s "
                      f"(ratio {med['sdbatch'] / med['diffusers']:.2f}); CPU time sdbatch {med_cpu['sdbatch']:.1f}s "
                      f"diffusers {med_cpu['diffusers']:.1f}s (ratio {med_cpu['sdbatch'] / med_cpu['diffusers']:.2f}); "
                      f"peak RSS sdbatch {peaks['sdbatch']:.1f} GiB, diffusers {peaks['diffusers']:.1f} GiB", flush=True)
        del model, pipe
    for (name, size, batch), med in results.items():
        if name != "fp32" and ("fp32", size, batch) in results:
            fp32 = results["fp32", size, batch]["diffusers"]
            print(f"{name} {size}x{size} batch {batch} (CPU time): sdbatch {fp32 / med['sdbatch']:.2f}x faster than "
                  f"diffusers fp32, {med['sdbatch'] / med['diffusers']:.2f}x diffusers {name}")


if __name__ == "__main__":
    main()
