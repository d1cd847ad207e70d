"""What the safeguards cost per image, in one run:

- marking a 512x512 image (what the job does after generating it) against encoding the same
  image to PNG with its A1111 `parameters` alone (what it did before): XMP only, XMP and the
  invisible watermark (the default), and all three marks with C2PA (a test CA and ES256 leaf);
- SD's safety checker at full size (CLIP ViT-L/14, random weights) on a batch of images,
  sdbatch against diffusers' StableDiffusionSafetyChecker, same dtype and threads, alternating.

Each timing is the median of --runs runs after one warm-up. The images are 1/f textures (as
tests/test_safeguards.py makes): the PNG encoder's and the watermark's cost depend on content.

    flock /tmp/sdbatch-bench.lock .venv/bin/python benchmarks/bench_safeguards.py
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdbatch.a1111 import encode_png
from sdbatch.model.safety import load_safety_checker
from sdbatch.provenance import C2paSigner, mark_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_safeguards import _cert, _name, natural_image  # noqa: E402

PARAMETERS = "a lighthouse at dusk\nSteps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512"


def median_seconds(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_signer() -> C2paSigner:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("bench CA"), _name("bench CA"), ca_key.public_key(), ca_key, ca=True)
    leaf = _cert(_name("bench"), ca.subject, leaf_key.public_key(), ca_key, ca=False, issuer_key=ca_key.public_key())
    pem = serialization.Encoding.PEM
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return C2paSigner(leaf.public_bytes(pem) + ca.public_bytes(pem), key)


def bench_marks(runs: int) -> None:
    image, signer = natural_image(512, 512, seed=0), test_signer()
    base = median_seconds(lambda: encode_png(image, PARAMETERS), runs)
    print(f"512x512, per image: PNG with parameters only (before) {base * 1000:.0f} ms")
    texts = {"parameters": PARAMETERS}
    for label, kwargs in (("+ XMP", dict(watermark=False)), ("+ XMP + watermark (default)", dict(watermark=True)),
                          ("+ XMP + watermark + C2PA", dict(watermark=True, signer=signer))):
        t = median_seconds(lambda: mark_image(image, texts, **kwargs), runs)
        print(f"  {label:<30} {t * 1000:6.0f} ms  ({t / base:.2f}x, +{(t - base) * 1000:.0f} ms)")


def bench_checker(runs: int, batch: int, dtype: torch.dtype) -> None:
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                        num_attention_heads=16, patch_size=14), projection_dim=768)
    ref = StableDiffusionSafetyChecker(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(Path(tmp) / "safety_checker")
        transformers.CLIPImageProcessorPil().save_pretrained(Path(tmp) / "feature_extractor")
        ours = load_safety_checker(tmp, dtype=dtype)
    ref = ref.to(dtype)
    images = [natural_image(512, 512, seed=i) for i in range(batch)]
    pixels = ours.preprocess(images)
    t_ref = median_seconds(lambda: ref(clip_input=pixels.to(dtype), images=np.zeros((batch, 1))), runs)
    t_ours = median_seconds(lambda: ours(pixels), runs)
    t_pre = median_seconds(lambda: ours.preprocess(images), runs)
    print(f"safety checker (ViT-L/14), batch {batch}, {str(dtype).removeprefix('torch.')}: diffusers "
          f"{t_ref / batch * 1000:.0f} ms/image, sdbatch {t_ours / batch * 1000:.0f} ms/image "
          f"({t_ours / t_ref:.2f}x); preprocessing {t_pre / batch * 1000:.1f} ms/image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="safety checker batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-checker", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_marks(args.runs)
    if not args.skip_checker:
        bench_checker(args.runs, args.batch, torch.float32)


if __name__ == "__main__":
    main()
