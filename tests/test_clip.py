import json

import pytest
import torch

from sdbatch.model.clip import CLIPTextEncoder, clip_config_from_diffusers, clip_state_dict_from_diffusers, infer_clip_config
from sdbatch.model.tokenizer import Tokenizer

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on mars, 4k, highly detailed", "東京 🐱"]


@pytest.fixture(scope="module")
def reference(tiny_components):
    return tiny_components["text_encoder"]


@pytest.fixture(scope="module")
def encoder(reference, tiny_diffusers_dir):
    sd = clip_state_dict_from_diffusers(reference.state_dict())
    config = clip_config_from_diffusers(json.loads((tiny_diffusers_dir / "text_encoder" / "config.json").read_text()))
    model = CLIPTextEncoder(config).eval()
    model.load_state_dict(sd)
    return model


def test_state_dict_keys_are_the_ldm_keys(tiny_ldm_state_dict, encoder):
    prefix = "cond_stage_model.transformer."
    ldm = {k[len(prefix) :] for k in tiny_ldm_state_dict if k.startswith(prefix)}
    assert set(encoder.state_dict()) == ldm - {"text_model.embeddings.position_ids"}
    assert not list(encoder.buffers())


def test_inferred_config_equals_diffusers_config(encoder):
    assert infer_clip_config(encoder.state_dict()) == encoder.config
    assert encoder.config.heads == 2 and encoder.config.width == 128


@torch.no_grad()
def test_matches_transformers(reference, encoder):
    tokens = Tokenizer()(PROMPTS)
    expected = reference(tokens).last_hidden_state
    out = encoder(tokens)
    assert out.shape == (len(PROMPTS), 77, 128)
    assert (out - expected).abs().max() < 1e-4
    assert expected.std() > 0.5  # a sane, non-degenerate output scale


@torch.no_grad()
def test_causal(encoder):
    tokens = Tokenizer()(["a photo of a cat", "a photo of a dog"])
    out = encoder(tokens)
    differs = tokens[0] != tokens[1]
    first = int(differs.nonzero()[0])
    assert torch.equal(out[0, :first], out[1, :first])
    assert (out[0, first:] - out[1, first:]).abs().amax(-1).min() > 0


@torch.no_grad()
def test_bfloat16_close_to_float32(encoder):
    tokens = Tokenizer()(PROMPTS)
    expected = encoder(tokens)
    out = CLIPTextEncoder(encoder.config)
    out.load_state_dict(encoder.state_dict())
    out = out.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()
