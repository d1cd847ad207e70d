"""Shared fixtures: tiny random-weight SD v1.x models in diffusers and single-file layouts,
an S3 endpoint on loopback, and the opt-in switch for full-size (slow) tests."""

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from sdbatch.model.tokenizer import VOCAB_DIR
from sdbatch.model.weights import DIFFUSERS_COMPONENTS, ldm_state_dict, randomize_, save_checkpoint

# SD v1.5's scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def pytest_configure(config):
    # The tiny test models gain nothing from threads, and on a busy machine OpenMP's spinning
    # barriers make two threads 10-50x slower than one; subprocesses inherit the setting.
    # (Here rather than at import: benchmarks import this module's builders.)
    threads = os.environ.setdefault("SDBATCH_TEST_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SDBATCH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="full SD1.5-size check: set SDBATCH_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _put_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def set_env(**values: str | None):
    """Set (None: unset) environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    _put_env(values)
    try:
        yield
    finally:
        _put_env(saved)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/sdbatch."""
    with set_env(SDBATCH_CACHE=str(tmp_path_factory.mktemp("sdbatch-cache"))):
        yield


def diffusers_components(scale: str = "tiny", seed: int = 0, names: tuple = ("unet", "vae", "text_encoder")) -> dict:
    """Randomised diffusers UNet2DConditionModel, AutoencoderKL and transformers CLIPTextModel.

    scale "tiny" is the shared test model (SD v1 structure, small widths); "full" is SD1.5's size.
    names picks the components to build.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = scale == "tiny"
    build = {}
    build["unet"] = lambda: UNet2DConditionModel(
        sample_size=8 if tiny else 64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64) if tiny else (320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=128 if tiny else 768,
        norm_num_groups=32,
    )
    build["vae"] = lambda: AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64) if tiny else (128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64 if tiny else 512,
        scaling_factor=0.18215,
    )
    build["text_encoder"] = lambda: CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=128 if tiny else 768,
            intermediate_size=256 if tiny else 3072,
            num_hidden_layers=2 if tiny else 12,
            num_attention_heads=2 if tiny else 12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return {name: randomize_(build[name](), seed + i).eval() for i, name in enumerate(build) if name in names}


def save_diffusers_folder(components: dict, folder: Path) -> Path:
    """Save the components as a StableDiffusionPipeline folder that diffusers loads offline."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        **components,
        tokenizer=CLIPTokenizer.from_pretrained(str(VOCAB_DIR), model_max_length=77),
        scheduler=PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "clip_sample"}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    # the tokenizer files as SD v1.5's folder has them (transformers 5 would write tokenizer.json)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(VOCAB_DIR, folder / "tokenizer", ignore=shutil.ignore_patterns("LICENSE"))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    special.update(unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special))
    config = dict(special, do_lower_case=True, model_max_length=77, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def ldm_checkpoint(components: dict) -> dict[str, torch.Tensor]:
    """The components' weights as a single-file LDM state dict, with the extras real files carry."""
    parts = {name: DIFFUSERS_COMPONENTS[name][1](module.state_dict()) for name, module in components.items()}
    sd = {k: v.clone() for k, v in ldm_state_dict(parts).items()}  # not sharing the modules' storage
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sd.update(
        {
            "betas": betas.float(),
            "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1].float()]),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
            "posterior_mean_coef1": (betas * alphas_cumprod.sqrt() / (1 - alphas_cumprod)).float(),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
            "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
        }
    )
    return sd


@pytest.fixture(scope="session")
def tiny_components() -> dict:
    """The tiny diffusers/transformers modules (fp32, eval mode) behind every tiny fixture."""
    return diffusers_components("tiny")


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tiny_components, tmp_path_factory) -> Path:
    return save_diffusers_folder(tiny_components, tmp_path_factory.mktemp("tiny") / "diffusers")


@pytest.fixture(scope="session")
def tiny_ldm_state_dict(tiny_components) -> dict[str, torch.Tensor]:
    return ldm_checkpoint(tiny_components)


@pytest.fixture(scope="session")
def tiny_safetensors(tiny_ldm_state_dict, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_checkpoint(tiny_ldm_state_dict, path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ldm_state_dict, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    save_checkpoint(tiny_ldm_state_dict, path)
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto server) on 127.0.0.1: yields its URL, e.g. http://127.0.0.1:PORT.

    Dummy credentials are set in the environment for the session; point s3fs at the
    endpoint with `storage_options={"endpoint_url": url}` (no region_name in client_kwargs).
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    with set_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_SECURITY_TOKEN="testing"):
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()
