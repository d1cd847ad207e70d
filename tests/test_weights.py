import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdbatch
from sdbatch.model.layers import PackedConv2d
from sdbatch.model.weights import CheckpointError, ModelConfig, read_safetensors, save_checkpoint, save_random_checkpoint

from conftest import diffusers_components, ldm_checkpoint, save_diffusers_folder


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference(tiny_safetensors):
    return sdbatch.load_model(tiny_safetensors)


def test_three_formats_load_identical_tensors(tiny_diffusers_dir, tiny_safetensors, tiny_ckpt, reference):
    for source in (tiny_diffusers_dir, tiny_ckpt, str(tiny_safetensors)):
        model = sdbatch.load_model(source)
        assert model.config == reference.config
        assert_same_weights(model, reference)
    assert reference.config.latent_scale == 0.18215
    assert reference.config.unet.channel_mult == (1, 2, 2, 2) and reference.config.unet.model_channels == 32
    assert reference.config.text_encoder.width == 128 and reference.config.vae.block_out_channels == (32, 32, 64, 64)


def test_loaded_model_matches_diffusers_components(tiny_components, reference):
    """End to end through the loader: tokens -> context -> eps, and the VAE, vs the reference modules."""
    with torch.no_grad():
        tokens = reference.tokenize(["a photo of a cat", ""])
        context = reference.text_encoder(tokens)
        assert (context - tiny_components["text_encoder"](tokens).last_hidden_state).abs().max() < 1e-4
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999, 1])
        eps = reference.unet(latents, t, context)
        expected = tiny_components["unet"](latents, t, context).sample
        assert (eps - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max())
        images = reference.vae.decode(latents)
        assert (images - tiny_components["vae"].decode(latents).sample).abs().max() < 1e-4


def test_single_file_layout_verified_by_diffusers(tiny_safetensors, tiny_diffusers_dir):
    """Our diffusers -> LDM renames, read back by diffusers' own LDM -> diffusers conversion."""
    from diffusers import StableDiffusionPipeline

    single = StableDiffusionPipeline.from_single_file(
        str(tiny_safetensors), config=str(tiny_diffusers_dir), local_files_only=True, safety_checker=None
    )
    folder = StableDiffusionPipeline.from_pretrained(str(tiny_diffusers_dir), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(single, name), getattr(folder, name))


def test_model_interface(reference):
    assert reference.device == torch.device("cpu") and reference.dtype == torch.float32
    tensors = list(reference.parameters()) + list(reference.buffers())
    assert all(not t.is_meta and not t.requires_grad for t in tensors)
    assert not reference.training
    # on CPU every convolution and linear layer is packed for oneDNN
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in reference.modules())
    assert isinstance(reference.unet.out[2], PackedConv2d) and isinstance(reference.vae.quant_conv, PackedConv2d)


def test_bare_ckpt_and_float_position_ids(tiny_ldm_state_dict, tmp_path, reference):
    sd = dict(tiny_ldm_state_dict)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    torch.save(sd, tmp_path / "bare.ckpt")
    assert_same_weights(sdbatch.load_model(tmp_path / "bare.ckpt"), reference)


def test_old_clip_layout_without_text_model_prefix(tiny_ldm_state_dict, tmp_path, reference):
    old = "cond_stage_model.transformer.text_model."
    sd = {k.replace(old, "cond_stage_model.transformer."): v for k, v in tiny_ldm_state_dict.items()}
    save_checkpoint(sd, tmp_path / "old.safetensors")
    assert_same_weights(sdbatch.load_model(tmp_path / "old.safetensors"), reference)


def ema_key(key: str) -> str:
    return "model_ema." + key[len("model.") :].replace(".", "")


def test_full_checkpoint_uses_ema_weights(tiny_ldm_state_dict, tmp_path, reference):
    sd = dict(tiny_ldm_state_dict)
    for key in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd[ema_key(key)] = sd[key]
        sd[key] = torch.randn_like(sd[key])  # the non-EMA weights differ
    save_checkpoint(sd, tmp_path / "full.ckpt")
    assert_same_weights(sdbatch.load_model(tmp_path / "full.ckpt"), reference)

    del sd[ema_key("model.diffusion_model.out.2.weight")]
    save_checkpoint(sd, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match=r"partial\.ckpt.*EMA.*diffusion_modelout2weight"):
        sdbatch.load_model(tmp_path / "partial.ckpt")


def test_unexpected_and_missing_keys_are_listed(tiny_ldm_state_dict, tmp_path):
    sd = dict(tiny_ldm_state_dict, **{"model.diffusion_model.extra.weight": torch.ones(1), "stray_key": torch.ones(1)})
    save_checkpoint(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: unexpected keys: stray_key"):
        sdbatch.load_model(tmp_path / "extra.safetensors")
    del sd["stray_key"]
    save_checkpoint(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unet keys .* unexpected model\.diffusion_model\.extra\.weight"):
        sdbatch.load_model(tmp_path / "extra.safetensors")

    sd = dict(tiny_ldm_state_dict)
    del sd["first_stage_model.decoder.conv_out.bias"], sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    save_checkpoint(sd, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: vae keys .* missing first_stage_model\.decoder\.conv_out\.bias"):
        sdbatch.load_model(tmp_path / "missing.safetensors")


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_ckpt_runs_nothing(tiny_ldm_state_dict, tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"first_stage_model.x": torch.ones(1)}, "hook": RunsCode(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "control")))  # the payload does run when unpickled unsafely
    assert (tmp_path / "control").exists()
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load.*nothing was executed"):
        sdbatch.load_model(path)
    assert not marker.exists()


def test_corrupt_files_name_the_file(tiny_safetensors, tiny_ckpt, tmp_path):
    cases = {
        "half.safetensors": tiny_safetensors.read_bytes()[: tiny_safetensors.stat().st_size // 2],
        "half.ckpt": tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2],
        "garbage.safetensors": os.urandom(4096),
        "garbage.ckpt": b"not a checkpoint at all" * 100,
        "empty.safetensors": b"",
    }
    messages = {
        "half.safetensors": "truncated",
        "half.ckpt": "truncated or corrupt",
        "garbage.safetensors": "not a safetensors file",
        "garbage.ckpt": "not a PyTorch checkpoint",
        "empty.safetensors": "not a safetensors file",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{tmp_path / name}: .*{messages[name]}"):
            sdbatch.load_model(tmp_path / name)


def test_non_sd_files(tmp_path):
    save_checkpoint({"encoder.weight": torch.ones(2, 2), "head.bias": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other\.safetensors: not a Stable Diffusion v1.x checkpoint.*head\.bias"):
        sdbatch.load_model(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"nothing-here\.ckpt: no such file"):
        sdbatch.load_model(tmp_path / "nothing-here.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match=r"folder: a folder without model_index\.json"):
        sdbatch.load_model(tmp_path / "folder")


def test_diffusers_folder_errors_name_the_file(tiny_diffusers_dir, tmp_path):
    folder = shutil.copytree(tiny_diffusers_dir, tmp_path / "copy")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"copy/vae: no weights file"):
        sdbatch.load_model(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(dict(config, use_linear_projection=True)))
    shutil.copy(tiny_diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae")
    with pytest.raises(CheckpointError, match=r"copy: unsupported diffusers config.*use_linear_projection"):
        sdbatch.load_model(folder)
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_diffusers_dir / "text_encoder" / "model.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model\.safetensors: not a diffusers SD v1.x vae"):
        sdbatch.load_model(folder)


def test_diffusers_folder_uses_its_own_tokenizer(tiny_diffusers_dir, tmp_path):
    folder = shutil.copytree(tiny_diffusers_dir, tmp_path / "copy")
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "!"  # as SD 2.x's tokenizer pads
    config_path.write_text(json.dumps(config))
    special = folder / "tokenizer" / "special_tokens_map.json"
    if special.exists():
        special.write_text(json.dumps(dict(json.loads(special.read_text()), pad_token="!")))
    tokens = sdbatch.load_model(folder).tokenize(["a photo of a cat"])
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]


def test_dtypes_and_auto(tiny_safetensors, reference):
    bf16 = sdbatch.load_model(tiny_safetensors, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.dtype == torch.bfloat16
    fp32 = reference.state_dict()
    for name, p in bf16.state_dict().items():
        assert torch.equal(p, fp32[name].bfloat16()), name
    auto = sdbatch.load_model(tiny_safetensors, device="auto", dtype="auto")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    expected = torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & set(flags) else torch.float32
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert auto.device == torch.device("cpu") and auto.dtype == expected
    with pytest.raises(ValueError, match="dtype"):
        sdbatch.load_model(tiny_safetensors, dtype="half")


def test_hash(tiny_safetensors, tiny_ckpt, tiny_diffusers_dir, reference):
    assert reference.hash == hashlib.sha256(tiny_safetensors.read_bytes()).hexdigest()
    assert sdbatch.load_model(tiny_ckpt).hash == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    files = [
        tiny_diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors",
        tiny_diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors",
        tiny_diffusers_dir / "text_encoder" / "model.safetensors",
    ]
    assert sdbatch.load_model(tiny_diffusers_dir).hash == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_hash_is_remembered_per_file_version(tiny_safetensors, tmp_path):
    copy = tmp_path / "copy.safetensors"
    shutil.copy(tiny_safetensors, copy)
    first = sdbatch.load_model(copy).hash
    assert sdbatch.load_model(copy).hash == first
    sd = read_safetensors(copy)
    sd["first_stage_model.decoder.conv_out.bias"] += 1
    save_checkpoint(sd, copy)
    changed = sdbatch.load_model(copy).hash
    assert changed != first and changed == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_safetensors_reader_matches_the_library(tiny_safetensors):
    from safetensors.torch import load_file

    ours, theirs = read_safetensors(tiny_safetensors), load_file(str(tiny_safetensors))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


def test_save_random_checkpoint(tmp_path):
    path = save_random_checkpoint(tmp_path / "random.safetensors", seed=3)
    model = sdbatch.load_model(path)
    again = sdbatch.load_model(save_random_checkpoint(tmp_path / "again.ckpt", seed=3))
    assert_same_weights(model, again)
    assert path.stat().st_size < 50 * 2**20
    with torch.no_grad():
        context = model.text_encoder(model.tokenize(["a photo of a cat"]))
        eps = model.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), context)
        image = model.vae.decode(eps)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


# ---------------------------------------------------------------------------------------------
# remote sources


@pytest.fixture
def bucket(s3_endpoint, tiny_safetensors, tiny_diffusers_dir, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    name = f"models-{tmp_path.name.lower().replace('_', '-')}"[:63]
    fs.mkdir(name)
    fs.put_file(str(tiny_safetensors), f"{name}/tiny.safetensors")
    fs.put(str(tiny_diffusers_dir), f"{name}/tiny-diffusers", recursive=True)
    for extra in ("safety_checker/model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"):
        fs.pipe(f"{name}/tiny-diffusers/{extra}", b"not needed")
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path / "cache"))
    return name


def test_s3_sources_are_cached_once(bucket, s3_endpoint, tmp_path, reference):
    options = {"endpoint_url": s3_endpoint}
    model = sdbatch.load_model(f"s3://{bucket}/tiny.safetensors", storage_options=options)
    assert_same_weights(model, reference)
    cached = [p for p in (tmp_path / "cache").rglob("tiny.safetensors")]
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = sdbatch.load_model(f"s3://{bucket}/tiny.safetensors", storage_options=options)
    assert cached[0].stat().st_mtime_ns == mtime and again.hash == model.hash

    folder = sdbatch.load_model(f"s3://{bucket}/tiny-diffusers", storage_options=options)
    assert_same_weights(folder, reference)
    (copy,) = (tmp_path / "cache").rglob("tiny-diffusers")
    copied = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert "unet/diffusion_pytorch_model.safetensors" in copied and "tokenizer/vocab.json" in copied
    assert not [p for p in copied if "safety_checker" in p or "fp16" in p]


def test_s3_concurrent_processes_share_one_copy(bucket, s3_endpoint, tmp_path):
    script = (
        "import sys, sdbatch\n"
        "m = sdbatch.load_model(sys.argv[1], storage_options={'endpoint_url': sys.argv[2]})\n"
        "print(m.hash)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"s3://{bucket}/tiny.safetensors", s3_endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    cache = tmp_path / "cache"
    entries = [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock" and p.parent != cache / "sha256"]
    assert [p.name for p in entries] == ["tiny.safetensors"]


def test_s3_missing_object(s3_endpoint, bucket):
    with pytest.raises(CheckpointError, match=rf"s3://{bucket}/nope\.ckpt: not found"):
        sdbatch.load_model(f"s3://{bucket}/nope.ckpt", storage_options={"endpoint_url": s3_endpoint})


# ---------------------------------------------------------------------------------------------
# full SD1.5 size (opt-in: SDBATCH_SLOW=1)


def digests(model) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_full_size_matches_diffusers(tmp_path):
    """SD1.5's size: parameter counts, both layouts, and each network against diffusers.

    Holds at most two copies of the weights (about 9 GiB) at a time.
    """
    components = diffusers_components("full")
    folder = save_diffusers_folder(components, tmp_path / "sd15")
    save_checkpoint(ldm_checkpoint(components), tmp_path / "sd15.safetensors")
    from_folder = digests(sdbatch.load_model(folder))
    model = sdbatch.load_model(tmp_path / "sd15.safetensors")
    assert digests(model) == from_folder
    assert model.config == ModelConfig(latent_scale=0.18215)
    assert sum(t.numel() for t in model.unet.state_dict().values()) == 859_520_964
    assert sum(t.numel() for t in model.vae.state_dict().values()) == 83_653_863
    assert sum(t.numel() for t in model.text_encoder.state_dict().values()) == 123_060_480

    def close(out: torch.Tensor, expected: torch.Tensor) -> bool:
        return (out - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max())

    with torch.no_grad():
        tokens = model.tokenize(["a photo of a cat", ""])
        context = model.text_encoder(tokens)
        assert close(context, components["text_encoder"](tokens).last_hidden_state)
        latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999, 500])
        assert close(model.unet(latents, t, context), components["unet"](latents, t, context).sample)
        decoded = components["vae"].decode(latents[:1]).sample
        assert close(model.vae.decode(latents[:1]), decoded)
        images = decoded.clamp(-1, 1)
        dist = components["vae"].encode(images).latent_dist
        mean, logvar = model.vae.encode(images)
        assert close(mean, dist.mean) and close(logvar, dist.logvar)
