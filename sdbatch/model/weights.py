"""Checkpoint files -> a ready Stable Diffusion v1.x model.

Reads original single-file checkpoints (CompVis/LDM layout, `.safetensors` or `.ckpt`) and
diffusers folders, from a local path or any fsspec URI (remote files are copied once into a
local cache shared by the processes of a node). Diffusers weights are renamed to the LDM keys,
the model is built on the meta device and the tensors are assigned into it, so loading never
holds two copies of the weights.
"""

import functools
import hashlib
import json
import os
import pickle
import shutil
import struct
import zipfile
from typing import BinaryIO
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch
from filelock import FileLock
from torch import nn

from ..builtin import BuiltinModelError, builtin_path, is_builtin
from .clip import CLIPConfig, CLIPTextEncoder, clip_config_from_diffusers, clip_state_dict_from_diffusers, infer_clip_config
from .layers import pack_for_cpu
from .tokenizer import Tokenizer
from .unet import UNetConfig, UNetModel, infer_unet_config, unet_config_from_diffusers, unet_state_dict_from_diffusers
from .vae import AutoencoderKL, VAEConfig, infer_vae_config, vae_config_from_diffusers, vae_state_dict_from_diffusers

LATENT_SCALE = 0.18215
SD_SIZE = 512  # the side, in pixels, SD v1.x was trained at (LDM's v1-inference.yaml: image_size 64 latents x 8)

# component (also its diffusers sub-folder and our attribute name) -> key prefix in a single-file checkpoint
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
# Keys real single-file checkpoints carry that nothing uses: LDM's noise-schedule buffers,
# the EMA bookkeeping, and CLIP's position ids (sometimes stored as floats; we use arange).
IGNORED_KEYS = frozenset(
    [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ]
)
EMA_PREFIX = "model_ema."
# VAE parts kept in float32 in a float16 model: the decoder overflows in float16
FP32_IN_FP16 = ("decoder.", "post_quant_conv.")
# diffusers folder: component -> (builder of our config, renamer to LDM keys, weight file stems)
DIFFUSERS_COMPONENTS = {
    "unet": (unet_config_from_diffusers, unet_state_dict_from_diffusers, "diffusion_pytorch_model"),
    "vae": (vae_config_from_diffusers, vae_state_dict_from_diffusers, "diffusion_pytorch_model"),
    "text_encoder": (clip_config_from_diffusers, clip_state_dict_from_diffusers, "model", "pytorch_model"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not an SD v1.x model; the message names the file."""


SUPPORTED = (
    "sdbatch runs SD v1.x text-to-image models only (a 4-channel U-Net conditioned on 768-wide "
    "CLIP ViT-L text features, epsilon prediction)"
)
# Key prefixes of single-file checkpoints of other model families (their original LDM/SGM layouts)
FOREIGN_PREFIXES = {
    "conditioner.embedders.": "an SDXL checkpoint (its text encoders are under conditioner.embedders.*)",
    "cond_stage_model.model.": "an SD 2.x checkpoint (its OpenCLIP ViT-H text encoder is under cond_stage_model.model.*)",
}
# U-Net input channels of known variants (SD v1.x text-to-image: 4, the latents alone)
UNET_INPUTS = {
    9: "an inpainting model (its U-Net takes 9 input channels: latents, mask and masked image)",
    5: "a depth-to-image model (its U-Net takes 5 input channels: latents and depth)",
    8: "an InstructPix2Pix model (its U-Net takes 8 input channels: latents and the input image)",
}
# width of the text conditioning -> family (SD v1.x: 768, CLIP ViT-L/14)
CONTEXT_WIDTHS = {1024: "an SD 2.x model (1024-wide OpenCLIP ViT-H text conditioning)",
                  2048: "an SDXL model (2048-wide text conditioning)"}


def unsupported_kind(config: "ModelConfig", prediction_type: str = "epsilon") -> str | None:
    """What a model is when it is not SD v1.x text-to-image (None when it is).

    Judged from its inferred/declared config: the U-Net's input and output channels, the width of
    its text conditioning, and (diffusers folders) the scheduler's prediction type.
    """
    unet = config.unet
    if unet.in_channels != 4:
        return UNET_INPUTS.get(unet.in_channels, f"a U-Net with {unet.in_channels} input channels (not 4)")
    if unet.out_channels != 4:
        return f"a U-Net with {unet.out_channels} output channels (not 4)"
    for width in (unet.context_dim, config.text_encoder.width):
        if width in CONTEXT_WIDTHS:
            return CONTEXT_WIDTHS[width]
    if prediction_type != "epsilon":
        return f"a {prediction_type} model (the scheduler's prediction_type; SD v1.x predicts the noise, epsilon)"
    return None


def _refuse_unsupported(path: Path, config: "ModelConfig", prediction_type: str = "epsilon") -> None:
    kind = unsupported_kind(config, prediction_type)
    if kind is not None:
        raise CheckpointError(f"{path}: refused: this is {kind}; {SUPPORTED}")


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: CLIPConfig = field(default_factory=CLIPConfig)
    latent_scale: float = LATENT_SCALE


class StableDiffusion(nn.Module):
    """The three networks, the tokenizer and the hyper-parameters of one SD v1.x model.

    `vae.decode` runs the decoder in float32 when the model is float16 (it overflows in
    float16); `load_model` sets that up, so convert dtypes by reloading rather than `.half()`.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None, files: tuple[Path, ...] = ()):
        super().__init__()
        self.config = config
        self.text_encoder = CLIPTextEncoder(config.text_encoder)
        self.unet = UNetModel(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.tokenize = tokenizer or Tokenizer()
        self._files = files

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the checkpoint file (of a diffusers folder's weight files, in a fixed order)."""
        return _sha256_files(self._files)


# ---------------------------------------------------------------------------------------------
# reading files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(f: BinaryIO, path: Path) -> tuple[dict[str, dict], int]:
    """({tensor name: dtype, shape, data_offsets}, header length) of an open .safetensors file,
    checked against the file's size; CheckpointError naming the file otherwise."""
    size = path.stat().st_size
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100_000_000:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
    try:
        header = json.loads(f.read(n))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header lists {8 + n + end} bytes, the file has {size}")
    return entries, n


def check_checkpoint(path: str | os.PathLike) -> None:
    """A cheap check that a local source is an SD checkpoint `load_model` can read, from headers
    and key names only (no tensor is read; a .ckpt is memory-mapped): for a job's driver, before
    anything starts. Raises CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        checkpoint_files(path)
        return
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            keys = list(_safetensors_header(f, path)[0])
    else:
        keys = list(read_torch(path))
    if not any(k.startswith(("model.diffusion_model.", "model_ema.diffusion_model")) for k in keys):
        raise CheckpointError(f"{path}: not a Stable Diffusion v1.x checkpoint: none of its {len(keys)} tensors "
                              f"is a U-Net weight (model.diffusion_model.*)")


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` (str -> str) of a .safetensors file's header; {} when it has none.
    Raises CheckpointError naming the file when it is not a safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        n = _safetensors_header(f, path)[1]
        f.seek(8)
        return json.loads(f.read(n)).get("__metadata__") or {}


def native_size(source: str | os.PathLike) -> int:
    """The square side, in pixels, a model makes best: the `resolution` it was trained at, as
    sdbatch's `jobs train` records it in a checkpoint's metadata (`sdbatch.settings`), else
    SD v1.x's SD_SIZE. Only the header of a local (or built-in) .safetensors file is read; any
    other source (remote URI, .ckpt, diffusers folder, missing file) gives SD_SIZE.
    Raises CheckpointError for an unknown or missing `builtin:NAME`."""
    protocol, _, rest = str(source).partition("://")
    if rest and protocol not in ("file", "local"):
        return SD_SIZE
    path = localize(source)
    if path.suffix != ".safetensors" or not path.is_file():
        return SD_SIZE
    try:
        side = json.loads(safetensors_metadata(path).get("sdbatch.settings", "{}")).get("resolution")
    except (ValueError, AttributeError):
        return SD_SIZE
    return side if isinstance(side, int) and side >= 8 and side % 8 == 0 else SD_SIZE


def size_or_native(source: str | os.PathLike, width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) in pixels, each one not given (None) being the model's `native_size`.
    Raises CheckpointError as `native_size`."""
    if width is not None and height is not None:
        return width, height
    side = native_size(source)
    return width or side, height or side


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file with plain reads into fresh tensors.

    Unlike a memory map (which stays resident while it is open), this holds each byte once,
    which keeps peak memory at the size of the weights.
    """
    with open(path, "rb") as f:
        entries, n = _safetensors_header(f, path)
        out = {}
        for name, info in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, stop = info["data_offsets"]
            buf = torch.empty(stop - begin, dtype=torch.uint8)
            f.seek(8 + n + begin)
            if f.readinto(buf.numpy()) != stop - begin:
                raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
            out[name] = buf.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        return out


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    """Read a .ckpt/.pt/.bin file safely: only tensors and plain containers are unpickled.

    Memory-mapped where the file format allows, so tensors a caller never touches (the
    non-EMA U-Net of a full checkpoint) cost no memory.
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # neither torch's zip format nor a legacy pickle
                raise CheckpointError(f"{path}: not a PyTorch checkpoint (truncated or corrupt: no zip directory)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors, which could run "
            f"code when unpickled (nothing was executed). Use a .safetensors version of this model or "
            f"re-save it from a trusted environment. Details: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (the file holds a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file by extension: .safetensors, anything else is a torch checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path)


def checkpoint_files(path: Path) -> tuple[Path, ...]:
    """The weight files `load_model` reads for a local single file or diffusers folder, in the
    order `StableDiffusion.hash` hashes them. Raises CheckpointError naming what is missing."""
    if not path.is_dir():
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file or folder")
        return (path,)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: a folder without model_index.json is not a diffusers model")
    return tuple(_diffusers_weight_file(path / name, tuple(stems)) for name, (_, _, *stems) in DIFFUSERS_COMPONENTS.items())


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 of a local checkpoint's weights without loading them: equals `load_model(path).hash`."""
    return _sha256_files(checkpoint_files(Path(path)))


def _sha256_files(files: tuple[Path, ...]) -> str:
    """sha256 of the files' bytes in order; remembered in the cache dir per (path, size, mtime)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo = cache_dir() / "sha256" / hashlib.sha256(repr(stats).encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f"{memo.name}.{os.getpid()}")
        partial.write_text(digest.hexdigest())
        os.replace(partial, memo)
    except OSError:
        pass  # a read-only cache only costs recomputing
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# single-file checkpoints and diffusers folders -> LDM state dicts per component


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def split_checkpoint(sd: dict[str, torch.Tensor], path: Path, ema: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """One LDM-layout state dict -> {component: state dict below its prefix}.

    A full checkpoint's EMA weights (`model_ema.<U-Net key without dots>`) replace the U-Net's,
    unless `ema` is False (training starts from the raw weights): then they are dropped.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    ema_weights, unexpected = {}, []
    for key in list(sd):
        value = sd.pop(key)
        if key in IGNORED_KEYS:
            continue
        if key.startswith(EMA_PREFIX):
            if ema:
                ema_weights[key[len(EMA_PREFIX) :]] = value
            continue
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
        else:
            unexpected.append(key)
    for prefix, kind in FOREIGN_PREFIXES.items():
        if any(k.startswith(prefix) for k in unexpected):
            raise CheckpointError(f"{path}: refused: this is {kind}; {SUPPORTED}")
    if "v_pred" in unexpected:
        raise CheckpointError(f"{path}: refused: this is a v-prediction model (its v_pred key); {SUPPORTED}")
    missing = [PREFIXES[name] + "*" for name, part in parts.items() if not part]
    if missing:
        raise CheckpointError(
            f"{path}: not a Stable Diffusion v1.x checkpoint: no keys under {', '.join(missing)}"
            + (f" (it has: {_listing(unexpected, 8)})" if unexpected else "")
        )
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys: {_listing(unexpected)}")
    parts["text_encoder"] = clip_state_dict_from_diffusers(parts["text_encoder"])  # old layouts lack text_model.
    if ema_weights:
        unet = parts["unet"]
        flat = {("diffusion_model." + k).replace(".", ""): k for k in unet}
        if set(ema_weights) != set(flat):
            raise CheckpointError(
                f"{path}: the EMA weights (model_ema.*) do not match the U-Net's: "
                f"missing {_listing(set(flat) - set(ema_weights))}; unexpected {_listing(set(ema_weights) - set(flat))}"
            )
        parts["unet"] = {k: ema_weights[f] for f, k in flat.items()}
    return parts


def _pick_weights(names: set[str], stems: tuple[str, ...]) -> str | None:
    """A diffusers component's weight file among `names`: full precision and safetensors first."""
    for suffix in (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin"):
        for stem in stems:
            if stem + suffix in names:
                return stem + suffix
    return None


def _diffusers_weight_file(folder: Path, stems: tuple[str, ...]) -> Path:
    name = _pick_weights({p.name for p in folder.glob("*") if p.is_file()}, stems)
    if name is None:
        raise CheckpointError(f"{folder}: no weights file ({', '.join(s + '.safetensors' for s in stems)})")
    return folder / name


def read_diffusers_folder(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], list[Path]]:
    """A diffusers folder -> ({component: config.json dict}, {component: LDM state dict}, weight files)."""
    configs, parts, files = {}, {}, []
    for name, (_, to_ldm, *stems) in DIFFUSERS_COMPONENTS.items():
        sub = folder / name
        try:
            configs[name] = json.loads((sub / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{sub / 'config.json'}: cannot read the {name} config: {e}") from None
        weights = _diffusers_weight_file(sub, tuple(stems))
        sd = read_weights(weights)
        try:
            parts[name] = to_ldm(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{weights}: not a diffusers SD v1.x {name}: {e}") from None
        files.append(weights)
    return configs, parts, files


def ldm_state_dict(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{component: state dict} -> one single-file LDM-layout state dict."""
    return {PREFIXES[name] + k: v for name, part in parts.items() for k, v in part.items()}


def save_checkpoint(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write an LDM-layout state dict as .safetensors, or as a `{"state_dict": ...}` .ckpt.

    The safetensors writer streams each tensor's bytes (no second copy of the weights);
    `metadata` (str -> str) goes into its `__metadata__` header (.safetensors only).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        if metadata:
            raise ValueError(f"{path}: metadata can only be stored in a .safetensors file")
        torch.save({"state_dict": sd}, path)
        return
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not so: {bad!r}")
        header["__metadata__"] = dict(metadata)
    for key, t in sd.items():
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in sd.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------------------------------------
# sources: local paths and fsspec URIs


def cache_dir() -> Path:
    return Path(os.environ.get("SDBATCH_CACHE") or Path.home() / ".cache" / "sdbatch")


def _remote_files(fs, root: str, info: dict) -> dict[str, dict]:
    """{relative name: fsspec info} to copy: the file itself, or what a diffusers folder needs
    (not, say, a safety checker or every precision variant of the weights)."""
    if info["type"] != "directory":
        return {"": info}
    listing = {name[len(root) + 1 :]: i for name, i in fs.find(root, detail=True).items()}
    wanted = [n for n in listing if n == "model_index.json" or n.split("/")[0] in ("tokenizer", "scheduler")]
    for name, (_, _, *stems) in DIFFUSERS_COMPONENTS.items():
        weights = _pick_weights({n[len(name) + 1 :] for n in listing if n.startswith(name + "/")}, tuple(stems))
        wanted += [f"{name}/config.json", f"{name}/{weights}"]
    return {n: listing[n] for n in wanted if n in listing}


def localize(source: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """A local path for `source`; a remote file or diffusers folder is copied once into `cache_dir()`.

    `builtin:NAME` is that built-in model's file (`sdbatch.builtin`); CheckpointError when the
    name is unknown or this install lacks the file.
    The cache entry is keyed by the remote files' names, sizes and ETags. It is written under a
    file lock, into a temporary name then renamed, so processes sharing a node (and cache)
    download once and never see a partial copy.
    """
    source = str(source)
    if is_builtin(source):
        try:
            return builtin_path(source)
        except BuiltinModelError as e:
            raise CheckpointError(str(e)) from None
    protocol, _, rest = source.partition("://")
    if not rest or protocol in ("file", "local"):
        return Path(rest or source).expanduser()
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    root = root.rstrip("/")
    try:
        files = _remote_files(fs, root, fs.info(root))
    except FileNotFoundError:
        raise CheckpointError(f"{source}: not found") from None
    versions = sorted((n, i.get("size"), i.get("ETag") or i.get("etag") or i.get("mtime") or "") for n, i in files.items())
    key = hashlib.sha256(repr((source, versions)).encode()).hexdigest()[:16]
    target = cache_dir() / key / Path(root).name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / ".lock")):
        if not target.exists():
            from fsspec.callbacks import TqdmCallback

            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by a process that died while copying
            for name, info in files.items():
                local = partial / name if name else partial
                local.parent.mkdir(parents=True, exist_ok=True)
                bar = {"desc": f"copy {source}/{name}".rstrip("/"), "unit": "B", "unit_scale": True}
                fs.get_file(info["name"], str(local), callback=TqdmCallback(tqdm_kwargs=bar))
            os.replace(partial, target)
    return target


# ---------------------------------------------------------------------------------------------
# loading


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def _auto_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def _read_source(path: Path, ema: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], ModelConfig, Tokenizer, tuple[Path, ...]]:
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: a folder without model_index.json is not a diffusers model")
        configs, parts, files = read_diffusers_folder(path)
        try:
            config = ModelConfig(
                **{name: DIFFUSERS_COMPONENTS[name][0](cfg) for name, cfg in configs.items()},
                latent_scale=configs["vae"].get("scaling_factor", LATENT_SCALE),
            )
        except (ValueError, KeyError) as e:
            kind = _diffusers_kind(configs)
            raise CheckpointError(f"{path}: refused: this is {kind}; {SUPPORTED}" if kind
                                  else f"{path}: unsupported diffusers config: {e}") from None
        _refuse_unsupported(path, config, _prediction_type(path))
        own = any((path / "tokenizer" / name).is_file() for name in ("vocab.json", "tokenizer.json"))
        tokenizer = Tokenizer(path / "tokenizer") if own else Tokenizer()
        return parts, config, tokenizer, tuple(files)
    parts = split_checkpoint(read_weights(path), path, ema)
    inferred = {}
    for name, infer in (("unet", infer_unet_config), ("vae", infer_vae_config), ("text_encoder", infer_clip_config)):
        try:
            inferred[name] = infer(parts[name])
        except KeyError as e:
            raise CheckpointError(f"{path}: missing key {PREFIXES[name]}{e.args[0]}") from None
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: cannot infer the {name}'s shape (not an SD v1.x checkpoint?): {e}") from None
    config = ModelConfig(**inferred)
    _refuse_unsupported(path, config)
    return parts, config, Tokenizer(), (path,)


def _prediction_type(folder: Path) -> str:
    """A diffusers folder's scheduler prediction type ("epsilon" when it does not say)."""
    try:
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return "epsilon"
    return scheduler.get("prediction_type") or "epsilon"


def _diffusers_kind(configs: dict) -> str | None:
    """What a diffusers folder is, from its raw configs, when they do not describe SD v1.x."""
    unet, text = configs["unet"], configs["text_encoder"]
    if unet.get("in_channels", 4) in UNET_INPUTS:
        return UNET_INPUTS[unet["in_channels"]]
    for width in (unet.get("cross_attention_dim"), text.get("hidden_size")):
        if width in CONTEXT_WIDTHS:
            return CONTEXT_WIDTHS[width]
    return None


def load_component_(
    module: nn.Module,
    name: str,
    sd: dict[str, torch.Tensor],
    source: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Check one network's LDM-layout state dict against `module` (built on the meta device)
    and assign the tensors into it, each moved to `device`/`dtype` as it goes (`sd` is emptied).

    In a float16 model the VAE decoder stays float32; on CPU/CUDA the VAE's convs are
    channels-last. `source` names the checkpoint in errors.
    """
    expected = module.state_dict()
    prefix = PREFIXES.get(name, "")
    missing = {prefix + k for k in set(expected) - set(sd)}
    unexpected = {prefix + k for k in set(sd) - set(expected)}
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: {name} keys do not match SD v1.x:"
            + (f" missing {_listing(missing)};" if missing else "")
            + (f" unexpected {_listing(unexpected)}" if unexpected else "")
        )
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: {name} tensor shapes do not match the inferred config: {_listing(wrong, 5)}")

    def place(key: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t.to(device)
        wide = dtype == torch.float16 and name == "vae" and key.startswith(FP32_IN_FP16)
        t = t.to(device, torch.float32 if wide else dtype)
        if name == "vae" and t.ndim == 4 and device.type in ("cpu", "cuda"):
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    module.load_state_dict({k: place(k, sd.pop(k)) for k in list(sd)}, assign=True)
    return module.eval().requires_grad_(False)


def load_model(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    storage_options: dict | None = None,
    *,
    ema: bool = True,
    packed: bool = True,
) -> StableDiffusion:
    """Load an SD v1.x model from a single-file checkpoint or a diffusers folder.

    source: local path or fsspec URI of a `.safetensors`/`.ckpt` (LDM layout) or a diffusers
    folder. device="auto" picks CUDA, then MPS, then CPU; dtype="auto" picks float16 on CUDA,
    bfloat16 on CPUs with AMX or AVX512-BF16, float32 otherwise. storage_options go to fsspec.
    ema: a full single-file checkpoint's EMA U-Net weights (False: its raw weights).
    On CPU (with `packed`) the convolutions and linear layers are packed for oneDNN
    (`layers.pack_for_cpu`): inference only, their weights are buffers rather than parameters.
    """
    device = _auto_device() if device == "auto" else torch.device(device)
    dtype = _auto_dtype(device) if dtype == "auto" else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or 'auto', not {dtype!r}")
    path = localize(source, storage_options)
    if not path.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    parts, config, tokenizer, files = _read_source(path, ema)

    with torch.device("meta"):
        model = StableDiffusion(config, tokenizer, files)
    for name in PREFIXES:
        load_component_(getattr(model, name), name, parts[name], path, device, dtype)
        if device.type == "cpu" and packed:
            pack_for_cpu(getattr(model, name))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# random weights (tests, smoke tests)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values at scales that keep activations sane.

    Layers that are usually zero-initialised (output convs, norms) get non-trivial values
    too, so a parameter loaded into the wrong place changes the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                value = 1.0 + 0.1 * noise
            elif p.ndim == 1:  # biases
                value = 0.1 * noise
            else:
                value = noise / p[0].numel() ** 0.5
            p.copy_(value)
    return module


TINY_CONFIG = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=128),
    vae=VAEConfig(block_out_channels=(32, 32, 64, 64)),
    text_encoder=CLIPConfig(width=128, layers=2, heads=2, mlp_width=256),
)


def save_random_checkpoint(path: str | Path, seed: int = 0, config: ModelConfig = TINY_CONFIG) -> Path:
    """Write a random-weight SD v1.x checkpoint in the LDM layout (.safetensors or .ckpt).

    The default config is tiny (a few MB) but has SD v1.x's structure, so the whole pipeline
    runs on it; `ModelConfig()` gives the full SD1.5 size.
    """
    model = randomize_(StableDiffusion(config), seed)
    parts = {name: getattr(model, name).state_dict() for name in PREFIXES}
    save_checkpoint(ldm_state_dict(parts), path)
    return Path(path)
