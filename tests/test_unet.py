"""The U-Net against diffusers' UNet2DConditionModel on the same random weights."""

import copy
import pickle

import pytest
import torch

from sdbatch.model.layers import PackedConv2d, pack_for_cpu
from sdbatch.model.unet import (
    UNetConfig,
    UNetModel,
    infer_unet_config,
    unet_config_from_diffusers,
    unet_state_dict_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=128,
    norm_num_groups=32,
)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norms and zero-initialised layers too) at scales that keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()


@pytest.fixture(scope="module")
def reference():
    """(diffusers model, its config dict, the converted LDM-layout state dict)."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    randomize(ref)
    return ref, dict(ref.config), unet_state_dict_from_diffusers(ref.state_dict())


@pytest.fixture(scope="module")
def ours(reference):
    _, config, sd = reference
    model = UNetModel(unet_config_from_diffusers(config)).eval()
    model.load_state_dict(sd, strict=True)
    return model


def inputs(batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g), torch.randn(batch, 77, TINY_UNET["cross_attention_dim"], generator=g)


@pytest.mark.parametrize("shape", [(8, 8), (8, 16), (6, 10)])  # 6x10: odd sizes below, upsampled to the skip size
@pytest.mark.parametrize("timesteps", [[1, 999], [500, 500], [250.5, 0.0]])
def test_matches_diffusers(reference, ours, shape, timesteps):
    ref = reference[0]
    x, context = inputs(2, *shape)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # the comparison means something
    assert max_rel_diff(got, expected) <= 1e-4


def test_scalar_timestep_broadcasts(ours):
    x, context = inputs(2, 8, 8)
    with torch.no_grad():
        batched = ours(x, torch.tensor([300, 300]), context)
        assert torch.equal(ours(x, 300, context), batched)
        assert torch.equal(ours(x, torch.tensor(300.0), context), batched)


def test_config_inferred_from_shapes(reference):
    _, config, sd = reference
    expected = unet_config_from_diffusers(config)
    assert expected == UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(0, 1, 2), context_dim=128
    )
    assert infer_unet_config(sd) == expected


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(model_channels=32, channel_mult=(2, 2), num_res_blocks=1, attention_levels=(1,), context_dim=16),
        UNetConfig(model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=3, attention_levels=(0, 2), context_dim=24),
        UNetConfig(model_channels=64, channel_mult=(1,), attention_levels=(), context_dim=32, transformer_depth=2),
        UNetConfig(model_channels=32, channel_mult=(1, 1), attention_levels=(0, 1), in_channels=9, out_channels=8, context_dim=16),
    ],
)
def test_other_shapes_build_run_and_infer(config):
    model = UNetModel(config).eval()
    assert infer_unet_config(model.state_dict()) == config
    x = torch.randn(1, config.in_channels, 8, 12)
    with torch.no_grad():
        out = model(x, torch.tensor([7]), torch.randn(1, 5, config.context_dim))
    assert out.shape == (1, config.out_channels, 8, 12)


def test_config_rejects_missing_attention_level():
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(0, 2))


def test_state_dict_keys_are_ldm_and_complete(reference, ours):
    _, _, sd = reference
    assert set(sd) == set(ours.state_dict())
    assert "input_blocks.3.0.op.weight" in sd and "output_blocks.2.1.conv.weight" in sd
    assert "output_blocks.5.2.conv.weight" in sd and "middle_block.1.transformer_blocks.0.ff.net.2.weight" in sd


def test_mis_mapped_weight_changes_output(reference, ours):
    _, config, sd = reference
    swapped = dict(sd)
    a, b = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    swapped[a], swapped[b] = sd[b], sd[a]
    wrong = UNetModel(unet_config_from_diffusers(config)).eval()
    wrong.load_state_dict(swapped, strict=True)
    x, context = inputs(2, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        assert max_rel_diff(wrong(x, t, context), ours(x, t, context)) > 1e-3


def test_bf16_close_to_fp32(ours, reference):
    _, config, sd = reference
    model = UNetModel(unet_config_from_diffusers(config)).eval()
    model.load_state_dict(sd)
    model.to(torch.bfloat16)
    x, context = inputs(2, 8, 8)
    t = torch.tensor([20, 800])
    with torch.no_grad():
        expected = ours(x, t, context)
        got = model(x, t, context)
    assert got.dtype == torch.float32  # the output comes back in the input's dtype
    assert max_rel_diff(got, expected) < 0.05


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_packed_for_cpu_matches_unpacked(reference, dtype, tolerance):
    _, config, sd = reference
    model = UNetModel(unet_config_from_diffusers(config)).eval()
    model.load_state_dict(sd)
    model.to(dtype)
    x, context = inputs(2, 8, 16)
    t = torch.tensor([30, 900])
    with torch.no_grad():
        expected = model(x, t, context)
        plain = model.state_dict()
        pack_for_cpu(model)
        got = model(x, t, context)
    assert isinstance(model.out[2], PackedConv2d) and isinstance(model.input_blocks[3][0].op, PackedConv2d)
    assert got.is_contiguous() and max_rel_diff(got, expected) <= tolerance
    packed = model.state_dict()
    assert packed.keys() == plain.keys() and all(torch.equal(packed[k], plain[k]) for k in plain)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_modules_stay_usable(reference):
    """Packed for one input shape, the U-Net still computes other shapes, copies and pickles,
    casts and moves (unpacking first), and loads a state dict."""
    _, config, sd = reference
    plain = UNetModel(unet_config_from_diffusers(config)).eval()
    plain.load_state_dict(sd)
    packed = pack_for_cpu(UNetModel(unet_config_from_diffusers(config)).eval())
    packed.load_state_dict(sd)
    t = torch.tensor([30, 900])
    with torch.no_grad():
        for h, w in ((8, 16), (16, 8), (24, 24)):  # the first call packs for 8x16
            x, context = inputs(2, h, w)
            assert max_rel_diff(packed(x, t, context), plain(x, t, context)) <= 1e-4
        assert packed.out[2].weight.is_mkldnn
        x, context = inputs(2, 8, 16)
        copied = pickle.loads(pickle.dumps(copy.deepcopy(packed)))
        assert torch.equal(copied(x, t, context), packed(x, t, context))

        packed.to(torch.float64)  # not packable: runs the plain ops
        plain.to(torch.float64)
        assert not packed.out[2].weight.is_mkldnn and packed.out[2].weight.dtype == torch.float64
        x, context = inputs(2, 8, 8)
        assert max_rel_diff(packed(x.double(), t, context.double()), plain(x.double(), t, context.double())) <= 1e-10
        assert not packed.out[2].weight.is_mkldnn

        packed.to(torch.float32)
        packed(x, t, context)
        assert packed.out[2].weight.is_mkldnn  # packed again on the next CPU call
        other = {k: v.clone() * 0.5 if k == "out.2.weight" else v for k, v in sd.items()}
        packed.load_state_dict(other)
        plain.to(torch.float32).load_state_dict(other)
        assert max_rel_diff(packed(x, t, context), plain(x, t, context)) <= 1e-4


def test_full_size_sd15_counts():
    with torch.device("meta"):
        model = UNetModel(UNetConfig())
    sd = model.state_dict()
    assert len(sd) == 686
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    assert infer_unet_config(sd) == UNetConfig()
    assert "time_embed.2.weight" in sd and "out.2.bias" in sd


def test_diffusers_single_file_loader_reads_our_keys(tmp_path, reference, ours):
    """diffusers' own LDM-checkpoint converter loads a file written from our state dict."""
    from safetensors.torch import save_file

    ref, config, _ = reference
    ref.save_config(tmp_path / "unet")
    path = tmp_path / "model.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    loaded = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(tmp_path), subfolder="unet", local_files_only=True
    ).eval()
    x, context = inputs(2, 8, 8)
    t = torch.tensor([5, 640])
    with torch.no_grad():
        assert max_rel_diff(loaded(x, t, encoder_hidden_states=context).sample, ours(x, t, context)) <= 1e-4


def test_bad_inputs_get_clear_errors(reference):
    _, config, sd = reference
    with pytest.raises(KeyError, match="input_blocks.0.0.weight"):
        infer_unet_config({k: v for k, v in sd.items() if k != "input_blocks.0.0.weight"})
    with pytest.raises(ValueError, match="use_linear_projection"):
        unet_config_from_diffusers({**config, "use_linear_projection": True})
    with pytest.raises(ValueError, match="bogus.weight"):
        unet_state_dict_from_diffusers({**reference[0].state_dict(), "bogus.weight": torch.zeros(1)})
