"""The pure-torch training pieces (sdbatch.model.training, .export) against diffusers' training recipe
(DDPMScheduler.add_noise, compute_snr, train_text_to_image.py's loss) on the same weights and
draws, and the exported checkpoint in sdbatch and in diffusers' from_single_file."""

import copy
import hashlib
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from test_pipeline import assert_images_close
from test_samplers import SD15_SCHEDULER_CONFIG, diffusers_scheduler

import sdbatch
from sdbatch.model import samplers
from sdbatch.model.clip import clip_config_from_diffusers
from sdbatch.model.export import diffusers_configs, export_checkpoint, write_diffusers_config
from sdbatch.model.layers import _Packed
from sdbatch.model.training import (
    CONFIGS,
    EMA,
    PosteriorCache,
    add_noise,
    calibrate_latent_scale_,
    diffusion_loss,
    drop_captions,
    encode_latents,
    gradient_checkpointing_,
    kl_divergence,
    load_for_training,
    min_snr_weights,
    new_model,
    tokenize_captions,
    vae_loss,
)
from sdbatch.model.unet import unet_config_from_diffusers
from sdbatch.model.vae import vae_config_from_diffusers
from sdbatch.model.weights import PREFIXES, randomize_, read_safetensors, save_checkpoint

TIMESTEPS = torch.tensor([0, 1, 17, 250, 500, 998, 999])


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)


def test_schedule_is_the_samplers_and_diffusers(scheduler):
    torch.testing.assert_close(samplers.alphas_cumprod(), scheduler.alphas_cumprod, rtol=0, atol=0)


def test_add_noise_matches_diffusers(scheduler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, len(TIMESTEPS), 4, 8, 8, generator=g).unbind(0)
    ours = add_noise(x0, noise, TIMESTEPS)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, TIMESTEPS), rtol=0, atol=0)
    assert not torch.equal(ours, add_noise(x0, noise, TIMESTEPS.flip(0)))  # the timestep matters per row


def test_min_snr_weights_match_diffusers(scheduler):
    gamma = 5.0
    snr = compute_snr(scheduler, TIMESTEPS)
    expected = torch.stack([snr, gamma * torch.ones_like(TIMESTEPS)], dim=1).min(dim=1)[0] / snr
    ours = min_snr_weights(TIMESTEPS, gamma)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert ours[0] < 0.01 and ours[-1] == 1  # low noise is down-weighted, high noise kept


# ----------------------------------------------------------------------------- the diffusion loss


@pytest.fixture(scope="module")
def unets(tiny_components, tiny_safetensors):
    """diffusers' tiny U-Net and ours with the same weights, both float32 and trainable."""
    ref = tiny_components["unet"]
    ours = load_for_training(tiny_safetensors).unet
    return ref, ours


def batch(seed: int = 1, n: int = 2, context_dim: int = 128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, context_dim, generator=g)


def diffusers_step(unet, scheduler, latents, context, seed, snr_gamma, noise_offset):
    """One loss as diffusers' examples/text_to_image/train_text_to_image.py computes it, with its
    torch.randn_like / torch.randint drawn from a generator seeded with `seed` instead."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    noise = noise.to(latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, context, return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(model_pred, noise, reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(model_pred, noise, reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


@pytest.mark.parametrize("snr_gamma,noise_offset", [(None, 0.0), (5.0, 0.1)], ids=["plain", "min-snr+offset"])
def test_diffusion_loss_matches_a_diffusers_step(unets, scheduler, snr_gamma, noise_offset):
    ref, ours = unets
    latents, context = batch(n=4)
    loss = diffusion_loss(ours, latents, context, torch.Generator().manual_seed(7), snr_gamma, noise_offset)
    with torch.no_grad():
        expected = diffusers_step(ref, scheduler, latents, context, 7, snr_gamma, noise_offset)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    other_seed = diffusion_loss(ours, latents, context, torch.Generator().manual_seed(8), snr_gamma, noise_offset)
    assert abs(other_seed.item() - loss.item()) > 1e-4

    # the same gradients, in float64 (in float32, rounding over the backward pass leaves up to 1e-3)
    ref, ours = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
    latents, context = latents.double(), context.double()
    loss = diffusion_loss(ours, latents, context, torch.Generator().manual_seed(7), snr_gamma, noise_offset)
    expected = diffusers_step(ref, scheduler, latents, context, 7, snr_gamma, noise_offset)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    loss.backward()
    expected.backward()
    # where the parameter names of the two layouts meet: the U-Net's input and output ends, a
    # cross-attention projection in the middle, the time embedding
    pairs = [(ours.input_blocks[0][0].weight, ref.conv_in.weight), (ours.out[2].weight, ref.conv_out.weight),
             (ours.middle_block[1].transformer_blocks[0].attn2.to_k.weight,
              ref.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight),
             (ours.time_embed[0].weight, ref.time_embedding.linear_1.weight)]
    for mine, theirs in pairs:
        assert theirs.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-12)


def test_diffusion_loss_is_reproducible(unets):
    _, ours = unets
    latents, context = batch()
    with torch.no_grad():
        first, again = (diffusion_loss(ours, latents, context, torch.Generator().manual_seed(3)) for _ in range(2))
    assert first.ndim == 0 and torch.equal(first, again)


def test_tiny_unet_overfits_one_batch():
    """From new_model("tiny"), one fixed batch: the loss (fresh noise and timesteps each step)
    falls to half its starting level well within 200 AdamW steps."""
    model = new_model("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        context = model.text_encoder(model.tokenize(["a red fox", "a blue house"]))
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = diffusion_loss(model.unet, latents, context, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) >= 20 and np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:10]):
            break
    assert np.isfinite(losses).all()
    start, end = np.mean(losses[:10]), np.mean(losses[-10:])
    assert end <= 0.5 * start, f"loss {start:.3f} -> {end:.3f} after {len(losses)} steps"


def test_gradient_checkpointing_gives_the_same_gradients(unets):
    _, ours = unets
    checkpointed = gradient_checkpointing_(copy.deepcopy(ours))
    latents, context = batch()
    grads = []
    for unet in (ours, checkpointed):
        unet.zero_grad()
        diffusion_loss(unet, latents, context, torch.Generator().manual_seed(2), snr_gamma=5.0).backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # inference is unchanged
        torch.testing.assert_close(checkpointed(latents, torch.tensor([10, 900]), context),
                                   ours(latents, torch.tensor([10, 900]), context))


# ----------------------------------------------------------------------------- VAE, conditioning


def test_vae_loss_terms_and_training():
    model = new_model("tiny", seed=1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    loss, parts = vae_loss(model.vae, images, torch.Generator().manual_seed(4))
    # by hand, with the same posterior draw
    mean, logvar = model.vae.encode(images)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    rec = (model.vae.decode(z) - images).abs().mean()
    std = torch.exp(0.5 * logvar)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(parts["rec"], rec.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kl"], kl.flatten(1).sum(1).mean().detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, rec + 1e-6 * kl.flatten(1).sum(1).mean() / images[0].numel(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_divergence(mean, logvar), kl.flatten(1).sum(1), rtol=1e-4, atol=1e-4)

    # a few steps on smooth images reduce the reconstruction error
    ramp = torch.linspace(-1, 1, 32)
    smooth = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32), ramp.outer(ramp)])[None]
    optimizer = torch.optim.AdamW(model.vae.parameters(), lr=2e-3)
    recs = []
    for _ in range(20):
        loss, parts = vae_loss(model.vae, smooth, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recs.append(parts["rec"].item())
    assert np.mean(recs[-3:]) < 0.8 * np.mean(recs[:3]), recs


def test_encode_latents_samples_the_scaled_posterior():
    model = new_model("tiny", seed=2)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_latents(model.vae, images, torch.Generator().manual_seed(9), model.config.latent_scale)
    with torch.no_grad():
        mean, logvar = model.vae.encode(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(latents, (mean + torch.exp(0.5 * logvar) * noise) * 0.18215)
    assert latents.shape == (2, 4, 4, 4) and not latents.requires_grad


def test_calibrated_vae_gives_unit_variance_latents_and_the_same_reconstructions():
    model = new_model("tiny", seed=2).eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = model.vae(images)
        std = encode_latents(model.vae, images, torch.Generator().manual_seed(3), model.config.latent_scale).std()
    k = calibrate_latent_scale_(model.vae, images, torch.Generator().manual_seed(3), model.config.latent_scale)
    with torch.no_grad():
        after = model.vae(images)
        latents = encode_latents(model.vae, images, torch.Generator().manual_seed(3), model.config.latent_scale)
    assert abs(k - 1 / float(std)) < 1e-4 * k and abs(float(latents.std()) - 1) < 1e-4
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_posterior_cache_encodes_each_key_once():
    model = new_model("tiny", seed=2).eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cache = PosteriorCache()
    mean, logvar = cache.encode(model.vae, images[:2], [10, 11])
    with torch.no_grad():
        expect = model.vae.encode(images[:2])
    torch.testing.assert_close((mean, logvar), expect)
    randomize_(model.vae, seed=5)  # a changed encoder shows which keys were encoded again
    with torch.no_grad():
        fresh = model.vae.encode(images[2:])
    mean, logvar = cache.encode(model.vae, images[[1, 2]], [11, 12])
    torch.testing.assert_close(mean, torch.cat([expect[0][1:], fresh[0]]))
    torch.testing.assert_close(logvar, torch.cat([expect[1][1:], fresh[1]]))


def test_caption_dropout():
    captions = [f"caption {i}" for i in range(1000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert dropped == drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    empty = [i for i, c in enumerate(dropped) if c == ""]
    assert 60 < len(empty) < 140 and all(dropped[i] == captions[i] for i in set(range(1000)) - set(empty))
    assert drop_captions(captions, 0.0, torch.Generator()) == captions
    assert drop_captions(captions[:5], 1.0, torch.Generator()) == [""] * 5
    with pytest.raises(ValueError, match="caption dropout"):
        drop_captions(captions, 1.5, torch.Generator())
    model = new_model("tiny", seed=0)
    tokens = tokenize_captions(model.tokenize, captions[:50], torch.Generator().manual_seed(0), dropout=0.1)
    assert torch.equal(tokens, model.tokenize(dropped[:50]))


# ----------------------------------------------------------------------------- EMA


def test_ema_math_and_state():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2, 2))]
    ema = EMA(params, decay=0.9)
    expected = [p.detach().double().clone() for p in params]
    for n in range(1, 6):
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        ema.update(params)
        d = min(0.9, (1 + n) / (10 + n))  # LDM LitEma's warm-up
        expected = [e * d + (1 - d) * p.detach().double() for e, p in zip(expected, params)]
        assert ema.current_decay() == d
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)

    plain = EMA([torch.zeros(1)], decay=0.5, warmup=False)
    plain.update([torch.ones(1)])
    assert plain.shadow[0].item() == 0.5

    restored = EMA([torch.zeros(3), torch.zeros(2, 2)], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 5 and restored.decay == 0.9
    restored.copy_to(params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        EMA([torch.zeros(3)]).load_state_dict(ema.state_dict())


def test_ema_of_a_module_tracks_trainable_parameters_by_name():
    model = new_model("tiny", seed=0)
    model.requires_grad_(False)
    model.unet.requires_grad_(True)
    ema = EMA(model, decay=0.99)
    assert ema.names and all(n.startswith("unet.") for n in ema.names)
    with pytest.raises(ValueError, match="do not match"):
        ema.update(model.unet)  # other names
    ema.update(model)
    ema.copy_to(model)


# ----------------------------------------------------------------------------- models


def test_new_model_is_seeded_and_trainable():
    state = torch.get_rng_state()
    a, b, c = new_model("tiny", 5), new_model("tiny", 5), new_model(CONFIGS["tiny"], 6)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["unet.input_blocks.0.0.weight"], sc["unet.input_blocks.0.0.weight"])
    assert all(p.requires_grad and p.dtype == torch.float32 for p in a.parameters())
    assert not any(isinstance(m, _Packed) for m in a.modules())
    with pytest.raises(ValueError, match="valid configs: tiny"):
        new_model("huge", 0)


def test_load_for_training_takes_raw_weights_unpacked(tiny_ldm_state_dict, tmp_path):
    sd = dict(tiny_ldm_state_dict)
    unet_keys = [k for k in sd if k.startswith(PREFIXES["unet"])]
    for key in unet_keys:  # a full checkpoint: EMA weights that differ from the raw ones
        sd["model_ema." + key[len("model."):].replace(".", "")] = sd[key] + 1
    save_checkpoint(sd, tmp_path / "full.safetensors")
    raw = load_for_training(tmp_path / "full.safetensors")
    ema = load_for_training(tmp_path / "full.safetensors", ema=True)
    key = "input_blocks.0.0.weight"
    assert torch.equal(raw.unet.state_dict()[key], tiny_ldm_state_dict[PREFIXES["unet"] + key])
    assert torch.equal(ema.unet.state_dict()[key], tiny_ldm_state_dict[PREFIXES["unet"] + key] + 1)
    assert not any(isinstance(m, _Packed) for m in raw.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in raw.parameters())
    assert raw.hash == hashlib.sha256((tmp_path / "full.safetensors").read_bytes()).hexdigest()


def test_load_for_training_reads_diffusers_folders(tiny_diffusers_dir, tiny_safetensors):
    folder, single = load_for_training(tiny_diffusers_dir), load_for_training(tiny_safetensors)
    a, b = folder.state_dict(), single.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model whose every weight is random and non-trivial, exported with metadata."""
    model = randomize_(new_model("tiny", 0), seed=11)
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    metadata = {"sdbatch.base_model_sha256": "0" * 64, "sdbatch.steps": "200", "sdbatch.data": "s3://b/t.parquet"}
    return model, path, export_checkpoint(model, path, metadata), metadata


def safetensors_metadata(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def test_export_round_trip_is_exact(trained):
    model, path, digest, metadata = trained
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert safetensors_metadata(path) == {"format": "pt", **metadata}
    assert all(k.startswith(tuple(PREFIXES.values())) for k in read_safetensors(path))  # the LDM layout
    loaded = sdbatch.load_model(path)
    assert loaded.hash == digest
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_export_to_s3(trained, s3_endpoint):
    import s3fs

    model, path, digest, _ = trained
    options = {"endpoint_url": s3_endpoint}
    s3fs.S3FileSystem(client_kwargs=options).mkdir("trained")
    uri = "s3://trained/run/model.safetensors"
    assert export_checkpoint(model, uri, {"sdbatch.steps": "1"}, storage_options={"client_kwargs": options}) != digest
    loaded = sdbatch.load_model(uri, storage_options={"client_kwargs": options})
    assert torch.equal(loaded.state_dict()["unet.out.2.weight"], model.state_dict()["unet.out.2.weight"])


def test_export_refuses_other_suffixes_and_metadata(trained, tmp_path):
    model = trained[0]
    with pytest.raises(ValueError, match="must be a .safetensors"):
        export_checkpoint(model, tmp_path / "model.ckpt", {})
    with pytest.raises(TypeError, match="str to str"):
        export_checkpoint(model, tmp_path / "model.safetensors", {"steps": 200})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_configs_describe_the_model(name):
    config, files = CONFIGS[name], diffusers_configs(CONFIGS[name])
    assert unet_config_from_diffusers(files["unet"]) == config.unet
    assert vae_config_from_diffusers(files["vae"]) == config.vae
    assert clip_config_from_diffusers(files["text_encoder"]) == config.text_encoder


PROMPTS, SEEDS, SIZE = ["a red fox in the snow", "a lighthouse at dusk"], [3, 77], 64


def diffusers_images(checkpoint, config_dir) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config_dir), local_files_only=True)
    pipe.scheduler = diffusers_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    return (images * 255).round().astype(np.uint8)


def test_export_loads_in_diffusers_with_the_same_images(trained, tmp_path):
    model, path, _, _ = trained
    config_dir = write_diffusers_config(model.config, tmp_path / "config")
    ours = sdbatch.generate(sdbatch.load_model(path), PROMPTS, seeds=SEEDS, steps=4, cfg_scale=5.0, sampler="euler",
                            width=SIZE, height=SIZE, progress=False)
    assert_images_close(diffusers_images(path, config_dir), ours, tol=2)

    # the comparison can fail: one pair of same-shaped tensors swapped in the file changes diffusers' images
    sd = read_safetensors(path)
    block = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2."
    sd[block + "to_k.weight"], sd[block + "to_v.weight"] = sd[block + "to_v.weight"], sd[block + "to_k.weight"]
    save_checkpoint(sd, tmp_path / "swapped.safetensors")
    swapped = diffusers_images(tmp_path / "swapped.safetensors", config_dir)
    assert np.abs(swapped.astype(int) - ours.astype(int)).max() > 2
