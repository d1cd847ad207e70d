"""AUTOMATIC1111's web API as sdbatch speaks it: request models, checks that name the bad
field, sampler and scheduler names, and the answers A1111 clients read.

A request becomes a `Job`: one row per image (A1111 numbers a request's images
seed, seed + 1, ... over batch_size * n_iter), all of one shape. Fields of A1111's API that
sdbatch does not implement are accepted while they hold a value that changes nothing (A1111's
default, or a setting that only matters with a feature left off), and refused with a 422 naming
the field otherwise. Names and defaults follow A1111's `modules/api/models.py` and
`modules/processing.py` (StableDiffusionProcessing's dataclass defaults: steps 50, cfg_scale 7,
512x512, img2img denoising_strength 0.75, sampler_index "Euler").
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdbatch.a1111 import A1111_SAMPLER_NAMES, a1111_parameters

# A1111 sampler -> {scheduler -> our sampler}. "automatic" is the sampler's own default: since
# A1111 1.9 that is Karras for DPM++ 2M (sd_samplers_kdiffusion.py: {'scheduler': 'karras'}) and
# the model's sigmas ("uniform") for the others.
SAMPLERS: dict[str, dict[str, str]] = {
    "DPM++ 2M": {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras", "uniform": "dpmpp_2m"},
    "Euler a": {"automatic": "euler_a", "uniform": "euler_a"},
    "Euler": {"automatic": "euler", "uniform": "euler"},
    "DDIM": {"automatic": "ddim"},
    "DDPM": {"automatic": "ddpm"},
}
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}  # name -> label
# Other names clients send: A1111's aliases, its pre-1.9 names with the scheduler in them, and ours.
_ALIASES: dict[str, tuple[str, str | None]] = {
    "k_euler_a": ("Euler a", None), "k_euler_ancestral": ("Euler a", None), "k_euler": ("Euler", None),
    "k_dpmpp_2m": ("DPM++ 2M", None), "DPM++ 2M Karras": ("DPM++ 2M", "karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
}
for _name, _schedules in SAMPLERS.items():
    for _scheduler, _ours in _schedules.items():
        if _scheduler != "automatic" or _ours not in _ALIASES:
            _ALIASES.setdefault(_ours, (_name, None if _scheduler == "automatic" else _scheduler))
_SAMPLER_LOOKUP = {k.lower(): v for k, v in {**{n: (n, None) for n in SAMPLERS}, **_ALIASES}.items()}


class RequestError(ValueError):
    """A request field that sdbatch cannot honour; answered with `status` and the field's name."""

    def __init__(self, field_name: str, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message, self.status = field_name, message, status

    def detail(self) -> dict[str, Any]:
        """FastAPI's validation-error shape, so clients parse both alike."""
        return {"detail": [{"loc": ["body", *self.field.replace("]", "").split("[")],
                            "msg": self.message, "type": "value_error"}]}


def resolve_sampler(sampler_name: str | None, scheduler: str | None) -> tuple[str, str, str]:
    """(A1111 sampler, scheduler name, our sampler) for a request's names; RequestError naming
    `sampler_name` or `scheduler` for names sdbatch lacks. None means A1111's default, "Euler"."""
    found = _SAMPLER_LOOKUP.get((sampler_name or "Euler").lower())
    if found is None:
        raise RequestError("sampler_name", f"unknown sampler {sampler_name!r}; known: {', '.join(SAMPLERS)} "
                           "(GET /sdapi/v1/samplers)")
    a1111, implied = found
    wanted = (scheduler or "automatic").lower()
    wanted = next((name for name, label in SCHEDULERS.items() if wanted in (name, label.lower())), wanted)
    if implied and wanted not in ("automatic", implied):
        raise RequestError("scheduler", f"{scheduler!r} contradicts sampler_name {sampler_name!r}")
    wanted = implied or wanted
    if wanted not in SAMPLERS[a1111]:
        known = ", ".join(SCHEDULERS.get(s, s) for s in SAMPLERS[a1111])
        raise RequestError("scheduler", f"{scheduler!r} is not available with {a1111} (available: {known})")
    return a1111, wanted, SAMPLERS[a1111][wanted]


def samplers_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: [{name, aliases, options}] as A1111 lists them."""
    aliases = {n: [a for a, (target, _) in _ALIASES.items() if target == n] for n in SAMPLERS}
    return [{"name": n, "aliases": aliases[n],
             "options": {"scheduler": "karras"} if SAMPLERS[n]["automatic"].endswith("karras") else {}}
            for n in SAMPLERS]


def schedulers_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: [{name, label, aliases, default_rho, need_inner_model}]."""
    return [{"name": n, "label": label, "aliases": None, "default_rho": 7.0 if n == "karras" else None,
             "need_inner_model": None} for n, label in SCHEDULERS.items()]


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Other A1111 fields arrive as extras and are checked by `inert`."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 50
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    send_images: bool = True


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the init images and denoising strength."""

    init_images: list[str] | None = None
    denoising_strength: float = Field(0.75, allow_inf_nan=False)


def _off(*fields: str):
    """Inert when every named field is off (False, None, 0, empty)."""
    return lambda v, extra: not any(extra.get(f) for f in fields)


def _one_of(*values: Any):
    return lambda v, extra: v is None or v in values


def _ANY(v, extra):  # settings of saving, logging and the like
    return True


# A1111 field -> when its value changes nothing here (v: the value, extra: all extra fields).
INERT = {
    "styles": lambda v, extra: not v, "subseed": _off("subseed_strength"), "subseed_strength": _one_of(0),
    "seed_resize_from_h": lambda v, extra: v is None or v <= 0,
    "seed_resize_from_w": lambda v, extra: v is None or v <= 0,
    "seed_enable_extras": _ANY, "restore_faces": _one_of(False), "tiling": _one_of(False),
    "do_not_save_samples": _ANY, "do_not_save_grid": _ANY, "save_images": _one_of(False),
    "s_churn": _one_of(0), "s_tmin": _off("s_churn"), "s_tmax": _off("s_churn"), "s_min_uncond": _one_of(0),
    "override_settings": lambda v, extra: not v, "override_settings_restore_afterwards": _ANY,
    "script_name": lambda v, extra: not v, "script_args": lambda v, extra: not v,
    "alwayson_scripts": lambda v, extra: not v, "refiner_checkpoint": lambda v, extra: not v,
    "refiner_switch_at": _off("refiner_checkpoint"), "disable_extra_networks": _ANY,
    "token_merging_ratio": _one_of(0), "comments": _ANY, "force_task_id": _ANY, "infotext": lambda v, extra: not v,
    "enable_hr": _one_of(False), "image_cfg_scale": _ANY, "include_init_images": _ANY,
    "resize_mode": _one_of(0), "mask": lambda v, extra: not v, "latent_mask": lambda v, extra: not v,
    "initial_noise_multiplier": _one_of(1), "user": _ANY,
}
for _f in ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
           "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg",
           "hr_additional_modules", "firstphase_width", "firstphase_height"):
    INERT[_f] = _off("enable_hr")
for _f in ("mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
           "inpaint_full_res_padding", "inpainting_mask_invert", "mask_round"):
    INERT[_f] = _off("mask")


def check_unsupported(extra: dict[str, Any], sampler: str, txt2img: bool) -> None:
    """RequestError naming the first A1111 field set to something sdbatch does not do. Fields A1111
    does not know either are ignored, as A1111 ignores them."""
    for name, value in extra.items():
        if name == "eta":  # A1111's default eta: 1 for ancestral samplers, 0 for DDIM; others ignore it
            ok = value is None or {"euler_a": value == 1, "ddim": value == 0}.get(sampler, True)
        elif name == "s_noise":  # scales the noise of ancestral steps (and of churn, kept off)
            ok = value is None or value == 1 or sampler != "euler_a"
        elif name == "denoising_strength" and txt2img:  # txt2img uses it for hires fix only
            ok = INERT["enable_hr"](extra.get("enable_hr"), extra)
        elif name in INERT:
            try:
                ok = INERT[name](value, extra)
            except TypeError:
                ok = False
        else:
            continue
        if not ok:
            raise RequestError(name, f"{value!r} is not supported by sdbatch (it serves plain txt2img and "
                               "img2img); leave the field out or at A1111's default")


def decode_image(text: str, name: str):
    """Base64 (optionally `data:image/...;base64,`-prefixed) -> RGB PIL image, read as a viewer shows
    it (`sdbatch.images.read_image`: orientation, transparency onto white); RequestError naming `name`."""
    from sdbatch.images import ImageReadError, read_image

    if not isinstance(text, str) or not text:
        raise RequestError(name, "expected a base64-encoded image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(name, f"not valid base64 ({exc})") from None
    try:
        return read_image(data, name="the image")
    except ImageReadError as exc:
        raise RequestError(name, f"not a readable image ({exc})") from None


@dataclass
class Limits:
    """What one request may ask of a replica."""

    max_pixels: int = 1024 * 1024     # width * height of one image
    max_images: int = 64              # batch_size * n_iter
    max_steps: int = 150


@dataclass
class Job:
    """One request's images: rows of prompt, negative_prompt, seed, steps, cfg_scale, sampler (ours),
    width, height, strength, init_image (bool), one shape for all; init_images: one RGB PIL image
    per row for img2img, else None."""

    rows: list[dict[str, Any]]
    init_images: list | None = None
    a1111_sampler: str = "Euler"
    scheduler: str = "automatic"
    created: float = field(default_factory=time.time)

    def chunks(self, size: int) -> list[Job]:
        """The job split into jobs of at most `size` rows (how A1111's n_iter splits a request)."""
        return [Job(self.rows[i:i + size], None if self.init_images is None else self.init_images[i:i + size],
                    self.a1111_sampler, self.scheduler, self.created) for i in range(0, len(self.rows), size)]


def _check_range(name: str, value: int | float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(name, f"{value} is outside [{low:g}, {high:g}]")


def make_job(req: Txt2ImgRequest, limits: Limits) -> Job:
    """The rows a request asks for, after checking every field; RequestError naming the first bad one."""
    txt2img = not isinstance(req, Img2ImgRequest)
    a1111, scheduler, sampler = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    _check_range("steps", req.steps, 1, limits.max_steps)
    for name in ("width", "height"):
        value = getattr(req, name)
        if value < 8 or value % 8:
            raise RequestError(name, f"{value} is not a positive multiple of 8")
    if req.width * req.height > limits.max_pixels:
        raise RequestError("width", f"{req.width}x{req.height} is more than this server's "
                           f"{limits.max_pixels} pixels per image", status=413)
    _check_range("batch_size", req.batch_size, 1, limits.max_images)
    _check_range("n_iter", req.n_iter, 1, limits.max_images)
    n = req.batch_size * req.n_iter
    if n > limits.max_images:
        raise RequestError("n_iter", f"batch_size * n_iter = {n} is more than this server's {limits.max_images} "
                           "images per request", status=413)
    seed = random.randrange(2**32) if req.seed == -1 else req.seed
    if not 0 <= seed or seed + n > 2**63:
        raise RequestError("seed", f"{req.seed} is outside [0, 2^63 - batch_size * n_iter] (or -1 for random)")
    check_unsupported(req.model_extra or {}, sampler, txt2img)
    init_images, strength = None, 1.0
    if not txt2img:
        if not req.init_images:
            raise RequestError("init_images", "img2img needs at least one base64 image")
        decoded = [decode_image(text, f"init_images[{i}]") for i, text in enumerate(req.init_images)]
        init_images = [decoded[i % len(decoded)] for i in range(n)]
        strength = req.denoising_strength
        if not 0 < strength <= 1:
            raise RequestError("denoising_strength", f"{strength} is outside (0, 1]")
        if int(req.steps * strength) < 1:
            raise RequestError("denoising_strength", f"{strength} with {req.steps} steps leaves no step to run")
    rows = [dict(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed + i, steps=req.steps,
                 cfg_scale=float(req.cfg_scale), sampler=sampler, width=req.width, height=req.height,
                 strength=strength, init_image=not txt2img) for i in range(n)]
    return Job(rows, init_images, a1111, scheduler)


def shape_key(row: dict[str, Any]) -> tuple:
    """Rows with the same key can share one `sdbatch.generate` call."""
    return tuple(row[k] for k in ("steps", "cfg_scale", "sampler", "width", "height", "init_image", "strength"))


def png_parameters(row: dict[str, Any], model_hash: str) -> str:
    """The `parameters` text of a row's PNG: the same as `jobs run` and `generate` write."""
    return a1111_parameters(row, model_hash)


def answer(req: Txt2ImgRequest, job: Job, outputs: list, model: dict[str, str]) -> dict[str, Any]:
    """A1111's answer: {images: [base64 PNG], parameters: the request, info: JSON string}.

    outputs: one `sdbatch.safeguards.Output` per row. An image the safety checker flagged is left
    out of `images` (which then holds the kept ones, in row order); info's per-row lists `nsfw`,
    `watermark` and `c2pa` (beside `all_seeds`) say which rows were left out and how the others
    are marked."""
    rows, first = job.rows, job.rows[0]
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest):
        parameters.update(init_images=None, mask=None)  # as A1111 does: not sent back
    info = {
        "prompt": first["prompt"], "all_prompts": [r["prompt"] for r in rows],
        "negative_prompt": first["negative_prompt"], "all_negative_prompts": [r["negative_prompt"] for r in rows],
        "seed": first["seed"], "all_seeds": [r["seed"] for r in rows],
        "subseed": -1, "all_subseeds": [-1] * len(rows), "subseed_strength": 0,
        "width": first["width"], "height": first["height"], "sampler_name": job.a1111_sampler,
        "scheduler": SCHEDULERS[job.scheduler], "cfg_scale": first["cfg_scale"], "steps": first["steps"],
        "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False,
        "sd_model_name": model["model_name"], "sd_model_hash": model["hash"][:10],
        "denoising_strength": first["strength"] if first["init_image"] else None,
        "extra_generation_params": {"Sampler (sdbatch)": A1111_SAMPLER_NAMES.get(first["sampler"], first["sampler"])},
        "index_of_first_image": 0, "infotexts": [png_parameters(r, model["hash"]) for r in rows],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": model["version"],
        "nsfw": [o.nsfw for o in outputs], "watermark": [o.watermark for o in outputs],
        "c2pa": [o.c2pa for o in outputs],
    }
    images = [base64.b64encode(o.png).decode() for o in outputs if o.png is not None] if req.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
