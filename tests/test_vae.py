import json

import pytest
import torch

import sdbatch
from sdbatch.model.vae import AutoencoderKL, infer_vae_config, vae_config_from_diffusers, vae_state_dict_from_diffusers


@pytest.fixture(scope="module")
def reference(tiny_components):
    return tiny_components["vae"]


@pytest.fixture(scope="module")
def vae(reference, tiny_diffusers_dir):
    config = vae_config_from_diffusers(json.loads((tiny_diffusers_dir / "vae" / "config.json").read_text()))
    model = AutoencoderKL(config).eval()
    model.load_state_dict(vae_state_dict_from_diffusers(reference.state_dict()))
    return model


def images(shape=(2, 3, 64, 64), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).clamp(-1, 1)


def test_state_dict_keys_are_the_ldm_keys(tiny_ldm_state_dict, vae):
    ldm = {k[len("first_stage_model.") :] for k in tiny_ldm_state_dict if k.startswith("first_stage_model.")}
    assert set(vae.state_dict()) == ldm
    assert vae.state_dict()["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm


def test_inferred_config_equals_diffusers_config(vae):
    assert infer_vae_config(vae.state_dict()) == vae.config


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 48, 80)])
def test_encode_matches_diffusers(reference, vae, shape):
    x = images(shape)
    dist = reference.encode(x).latent_dist
    mean, logvar = vae.encode(x)
    assert mean.shape == (shape[0], 4, shape[2] // 8, shape[3] // 8)
    assert (mean - dist.mean).abs().max() < 1e-4 * max(1.0, dist.mean.abs().max())
    assert (logvar - dist.logvar).abs().max() < 1e-4 * max(1.0, dist.logvar.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 6, 10)])
def test_decode_matches_diffusers(reference, vae, shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = reference.decode(z).sample
    out = vae.decode(z)
    assert out.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert (out - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max())
    assert expected.std() > 0.1


@torch.no_grad()
def test_logvar_is_clamped(reference, vae):
    x = images((1, 3, 64, 64))
    for bias in (1e3, -1e3):
        saved = [model.quant_conv.bias.clone() for model in (vae, reference)]
        for model in (vae, reference):
            model.quant_conv.bias[4:] += bias
        try:
            _, logvar = vae.encode(x)
            expected = reference.encode(x).latent_dist.logvar
        finally:
            for model, original in zip((vae, reference), saved):
                model.quant_conv.bias.copy_(original)
        assert torch.equal(logvar, torch.full_like(logvar, 20.0 if bias > 0 else -30.0))
        assert torch.equal(logvar, expected)


@torch.no_grad()
def test_float16_model_keeps_decoder_in_float32(tiny_safetensors):
    model = sdbatch.load_model(tiny_safetensors, dtype=torch.float16)
    assert model.dtype == torch.float16
    assert model.vae.encoder.conv_in.weight.dtype == torch.float16
    assert model.vae.decoder.conv_in.weight.dtype == torch.float32
    assert model.vae.post_quant_conv.weight.dtype == torch.float32
    all_half = sdbatch.load_model(tiny_safetensors, dtype=torch.float16)
    all_half.vae.half()
    fp32 = sdbatch.load_model(tiny_safetensors)
    for m in (model, all_half, fp32):  # activations beyond float16's range (65504), as in SD's real decoder
        m.vae.decoder.mid.block_1.conv2.weight.mul_(3e4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert not torch.isfinite(all_half.vae.decode(z.half())).all()
    out, expected = model.vae.decode(z.half()), fp32.vae.decode(z)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < 1e-2 * expected.abs().max()


@torch.no_grad()
def test_bfloat16_close_to_float32(tiny_safetensors, vae):
    model = sdbatch.load_model(tiny_safetensors, dtype=torch.bfloat16)
    assert model.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = vae.decode(z)
    out = model.vae.decode(z.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()
    mean, _ = model.vae.encode(images((1, 3, 64, 64)).bfloat16())
    assert (mean.float() - vae.encode(images((1, 3, 64, 64)))[0]).abs().max() < 0.1 * mean.float().abs().max()
