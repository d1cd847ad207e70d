"""U-Net forward at full SD1.5 size: sdbatch against diffusers on the same random weights.

All models share one set of weights, run in the same dtype and thread count, alternating:
diffusers' UNet2DConditionModel, ours as `load_model` gives it on CPU (conv/linear weights
packed once for oneDNN by `pack_for_cpu`), and ours unpacked, for comparison. With --compile,
also ours unpacked under torch.compile (inductor, frozen weights prepacked for oneDNN); the
compile time of the first shape is printed. With --profile, also where the time goes: for
diffusers and ours as loaded, the seconds and GFLOP/s of the convolutions, the linear layers
and attention in one forward (the profiler's per-op times; flops of convolution and linear
layers from torch.utils.flop_counter, of attention 4·B·heads·Lq·Lk·d from its shapes). Full size needs up to 7 GiB (fp32); on a shared machine
take the benchmark lock, and on a busy one time CPU seconds of one thread (--threads 1 --cpu-time):

    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_unet.py --size 256 512 --dtype fp32 bf16
"""

import argparse
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from sdbatch.model.layers import pack_for_cpu
from sdbatch.model.unet import UNetModel, unet_config_from_diffusers, unet_state_dict_from_diffusers

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(dtype: torch.dtype) -> tuple[torch.nn.Module, UNetModel]:
    """diffusers' model with its own random init, and ours loaded from the same tensors (no copy)."""
    ref = UNet2DConditionModel(**SD15_UNET).to(dtype).eval()
    with torch.device("meta"):
        ours = UNetModel(unet_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(unet_state_dict_from_diffusers(ref.state_dict()), strict=True, assign=True)
    return ref, ours.eval()


def packed_copy(model: UNetModel) -> UNetModel:
    with torch.device("meta"):
        copy = UNetModel(model.config)
    copy.load_state_dict(model.state_dict(), assign=True)  # shares the tensors until packing
    return pack_for_cpu(copy.eval())


# profiler op names (substrings) of each kind, for our packed layers and diffusers' plain ones
OP_KINDS = {
    "convolution": ("convolution",),
    "linear": ("linear_pointwise", "aten::addmm", "aten::mm"),
    "attention": ("scaled_dot_product",),
}


def profile_kinds(run, flop_twin) -> dict[str, tuple[float, float]]:
    """{kind: (seconds, GFLOP/s)} of one call of `run`; `flop_twin` is the same computation
    in plain aten ops (packed oneDNN ops are invisible to the flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        flop_twin()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops = {"convolution": counts.get("aten.convolution", 0),
             "linear": counts.get("aten.addmm", 0) + counts.get("aten.mm", 0), "attention": 0}
    with torch.profiler.profile(record_shapes=True) as prof:
        run()
    seconds = dict.fromkeys(OP_KINDS, 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        kind = next((k for k, names in OP_KINDS.items() if any(n in event.key for n in names)), None)
        if kind is None:
            continue
        seconds[kind] += event.self_cpu_time_total / 1e6
        if event.key == "aten::scaled_dot_product_attention":
            (b, heads, lq, d), (_, _, lk, _) = event.input_shapes[:2]
            flops["attention"] += 4 * b * heads * lq * lk * d * event.count
    return {k: (seconds[k], flops[k] / seconds[k] / 1e9 if seconds[k] else 0.0) for k in OP_KINDS}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[256], help="image sizes (latent = size / 8)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per model (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU seconds instead of wall time")
    parser.add_argument("--compile", action="store_true", help="add the unpacked U-Net under torch.compile")
    parser.add_argument("--profile", action="store_true", help="also the time and GFLOP/s of each kind of op")
    args = parser.parse_args()
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {'CPU' if args.cpu_time else 'wall'} time")

    for name in args.dtype:
        dtype = DTYPES[name]
        ref, ours = build(dtype)
        packed = packed_copy(ours)
        compiled = torch.compile(ours) if args.compile else None
        for size in args.size:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, 4, size // 8, size // 8, generator=g).to(dtype)
            context = torch.randn(args.batch, 77, 768, generator=g).to(dtype)
            t = torch.tensor([999, 500][: args.batch] + [1] * max(0, args.batch - 2))
            runs = {
                "diffusers": lambda: ref(x, t, encoder_hidden_states=context).sample,
                "sdbatch": lambda: packed(x, t, context),
                "unpacked": lambda: ours(x, t, context),
            }
            if compiled is not None:
                runs["compiled"] = lambda: compiled(x, t, context)
            times: dict[str, list[float]] = {k: [] for k in runs}
            with torch.inference_mode():
                for k, fn in runs.items():
                    warm_up = timed(fn, time.perf_counter)  # oneDNN primitive creation, allocator, compilation
                    if k == "compiled":
                        print(f"{name} {size}x{size}: torch.compile took {warm_up:.0f}s", flush=True)
                for _ in range(args.runs):
                    for k, fn in runs.items():
                        times[k].append(timed(fn, clock))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{name} {size}x{size}: diffusers {med['diffusers']:.2f}s, "
                + ", ".join(f"{k} {med[k]:.2f}s (ratio {med[k] / med['diffusers']:.2f})" for k in runs if k != "diffusers")
                + f"; peak RSS {peak_rss_gib():.1f} GiB; runs "
                + str({k: [round(v, 2) for v in vs] for k, vs in times.items()}),
                flush=True,
            )
            if args.profile:
                with torch.inference_mode():
                    for label, run, twin in (("diffusers", runs["diffusers"], runs["diffusers"]),
                                             ("sdbatch", runs["sdbatch"], runs["unpacked"])):
                        kinds = profile_kinds(run, twin)
                        print(f"{name} {size}x{size} {label}: " + ", ".join(
                            f"{k} {sec:.2f}s {rate:.0f} GFLOP/s" for k, (sec, rate) in kinds.items()), flush=True)
        del ref, ours, packed, compiled


if __name__ == "__main__":
    main()
