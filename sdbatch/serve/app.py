"""The Ray Serve application: model replicas that batch requests by shape, and an ingress that
speaks AUTOMATIC1111's web API and serves the web page at `/`.

    serve run sdbatch.serve.app:build model=path/to/model.safetensors   # or a config: serve.yaml
    python -m sdbatch serve --model SRC [--host H] [--port P] [--replicas N|auto]

`build(args)` is the application builder that `serve run`, `serve deploy` and `ray job submit`
import. Its args (strings, as a config file's `args:` gives them): model (required), replicas
(N, "auto", or default one per GPU / one on CPU), max_batch_size (images per model call,
default 8 on GPU, 4 on CPU), batch_wait_timeout_s (0.05), dtype ("auto"), max_pixels, max_images,
max_steps (see `a1111_api.Limits`), and the safeguard options of `jobs run` and `generate`
(`SAFEGUARD_ARGS`: safety_checker, blocklist, no_watermark, c2pa_cert, c2pa_key; see
`sdbatch.safeguards`).

Safeguards: the ingress refuses a prompt the blocklist matches (422 naming the rule) before
anything is generated; a model replica screens each batch with the safety checker on its device,
then marks the kept images (watermark, XMP, C2PA) in a thread of its own, off the batch loop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import time
from typing import Any

from ray import serve

from sdbatch.safeguards import Output, SafeguardSettings, Safeguards
from sdbatch.serve.a1111_api import Job, Limits, RequestError, Txt2ImgRequest, shape_key

BOARD = "sdbatch-serve-progress"
# build()'s args for the safeguards: the dests of `sdbatch.safeguards.add_arguments`
SAFEGUARD_ARGS = ("safety_checker", "blocklist", "no_watermark", "c2pa_cert", "c2pa_key")


class ProgressBoard:
    """Where the model replicas post how far their current batch is (a Ray actor, one per
    application): {replica: {step, steps, images, started}}; the ingress reads it for
    /sdapi/v1/progress and the page's progress bar."""

    def __init__(self):
        self.replicas: dict[str, dict[str, Any]] = {}

    def post(self, replica: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self.replicas.pop(replica, None)
        else:
            self.replicas[replica] = state

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.replicas)


def _board_name() -> str:
    return f"{BOARD}-{serve.get_replica_context().app_name}"


def _steps_run(row: dict[str, Any]) -> int:
    return int(row["steps"] * row["strength"]) if row["init_image"] else row["steps"]


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class Generator:
    """One model replica. Calls to `generate` that arrive together are batched (Ray Serve's
    dynamic batching, up to max_batch_size images); the batch is split by shape and each part is
    one `sdbatch.generate` call, so every image equals what `generate` makes for its seed. The
    replica's safeguards (all but the blocklist, which the ingress applies) screen and mark them."""

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", threads: int | None = None,
                 max_batch_size: int = 4, batch_wait_timeout_s: float = 0.05,
                 safeguards: SafeguardSettings | None = None):
        import torch

        import sdbatch

        if threads:
            torch.set_num_threads(threads)
        self.model = sdbatch.load_model(model, device=device, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        self.source = model
        self.guards = Safeguards(dataclasses.replace(safeguards or SafeguardSettings(), blocklist=None),
                                 device=str(self.model.device))
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.board = None
        self.state: dict[str, Any] | None = None
        self.last_post = 0.0
        self.model.unet.register_forward_hook(self._step)  # one U-Net call per sampling step

    def info(self) -> dict[str, str]:
        """What /sdapi/v1/sd-models and the PNGs say of the model."""
        import sdbatch

        name = os.path.basename(self.source.rstrip("/"))
        return {"title": f"{name} [{self.model.hash[:10]}]", "model_name": os.path.splitext(name)[0],
                "hash": self.model.hash, "filename": self.source, "device": str(self.model.device),
                "dtype": str(self.model.dtype).removeprefix("torch."), "version": f"sdbatch {sdbatch.__version__}"}

    async def generate(self, job: Job) -> list[Output | None]:
        """The job's images in row order, after the safeguards (`sdbatch.safeguards.Output`: png
        None for an image the safety checker flagged); None for a row that came out non-finite."""
        made = await self._batch(job)
        # Marking (watermark, PNG, C2PA) in a thread outside the batch: the next batch can start.
        return await asyncio.to_thread(self._mark, job, made)

    def _mark(self, job: Job, made: list[tuple | None]) -> list[Output | None]:
        from sdbatch.serve.a1111_api import png_parameters

        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(job.created))
        return [None if m is None else Output(None, True, False, False) if m[1] else
                self.guards.mark(m[0], png_parameters(row, self.model.hash), f"{stamp}-{row['seed']}.png")
                for row, m in zip(job.rows, made)]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=lambda jobs: sum(len(j.rows) for j in jobs))
    async def _batch(self, jobs: list[Job]) -> list[list[tuple | None]]:
        # In a thread: the event loop keeps taking requests (the next batch forms meanwhile).
        return await asyncio.to_thread(self._generate, jobs)

    def _generate(self, jobs: list[Job]) -> list[list[tuple | None]]:
        """Each job's (uint8 (H, W, 3) image, flagged by the safety checker) in row order; None for
        a row that came out non-finite (NaN/inf)."""
        import sdbatch
        from sdbatch.model.pipeline import NonFiniteError

        rows = [(j, k) for j, job in enumerate(jobs) for k in range(len(job.rows))]
        rows.sort(key=lambda jk: shape_key(jobs[jk[0]].rows[jk[1]]))
        out: list[list[tuple | None]] = [[None] * len(job.rows) for job in jobs]
        groups = [list(g) for _, g in itertools.groupby(rows, key=lambda jk: shape_key(jobs[jk[0]].rows[jk[1]]))]
        total = sum(_steps_run(jobs[g[0][0]].rows[g[0][1]]) * len(g) for g in groups)
        self.state = {"step": 0, "steps": total, "images": len(rows), "started": time.time()}
        try:
            for group in groups:
                batch = [jobs[j].rows[k] for j, k in group]
                first = batch[0]
                self.state["per_call"] = len(batch)
                init = None if not first["init_image"] else [jobs[j].init_images[k] for j, k in group]
                bad: set[int] = set()
                try:
                    images = sdbatch.generate(
                        self.model, [r["prompt"] for r in batch], [r["negative_prompt"] for r in batch],
                        seeds=[r["seed"] for r in batch], steps=first["steps"], cfg_scale=first["cfg_scale"],
                        sampler=first["sampler"], width=first["width"], height=first["height"], init_images=init,
                        strength=first["strength"], progress=False)
                except NonFiniteError as exc:  # only those rows' requests fail, not their batch mates'
                    images, bad = exc.images, set(exc.rows)
                nsfw = self.guards.screen(images)  # on the model's device, before the watermark
                for i, ((j, k), image) in enumerate(zip(group, images)):
                    out[j][k] = None if i in bad else (image, bool(nsfw[i]))
        finally:
            self.state = None
            self._post(force=True)
        return out

    def _step(self, module, inputs, output) -> None:
        if self.state is not None:
            self.state["step"] = min(self.state["steps"], self.state["step"] + self.state.get("per_call", 1))
            self._post()

    def _post(self, force: bool = False) -> None:
        import ray

        now = time.monotonic()
        if not force and now - self.last_post < 0.2:
            return
        self.last_post = now
        if self.board is None:
            try:
                self.board = ray.get_actor(_board_name())
            except ValueError:  # the ingress has not made it yet
                return
        self.board.post.remote(self.replica, None if self.state is None else dict(self.state))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """HTTP: the A1111 API under /sdapi/v1/ and the Gradio page at /."""

    def __init__(self, generator, max_batch_size: int = 4, limits: Limits | None = None,
                 safeguards: SafeguardSettings | None = None):
        import ray

        self.generator = generator
        self.max_batch_size = max_batch_size
        self.limits = limits or Limits()
        self.guards = Safeguards(SafeguardSettings(blocklist=(safeguards or SafeguardSettings()).blocklist))
        self.pending = 0
        self._model: dict[str, str] | None = None
        self.board = ray.remote(num_cpus=0)(ProgressBoard).options(
            name=_board_name(), get_if_exists=True, lifetime=None).remote()

    def __serve_build_asgi_app__(self):
        from sdbatch.serve.routes import build_asgi_app

        return build_asgi_app(self)

    async def model(self) -> dict[str, str]:
        if self._model is None:
            self._model = await self.generator.info.remote()
        return self._model

    async def run(self, req: Txt2ImgRequest) -> dict[str, Any]:
        """Checks the request (RequestError; a prompt the blocklist matches: 422 naming the rule,
        nothing generated), generates its images (split into calls of at most max_batch_size
        images, batched with other requests' calls) and builds A1111's answer. An image that comes
        out non-finite fails its request only: RequestError, status 500."""
        from sdbatch.serve.a1111_api import answer, make_job

        job = make_job(req, self.limits)
        refused = self.guards.check_prompt(req.prompt, req.negative_prompt)
        if refused:
            field = "prompt" if self.guards.check_prompt(req.prompt, None) else "negative_prompt"
            raise RequestError(field, f"{refused}: nothing generated")
        self.pending += 1
        try:
            parts = await asyncio.gather(*[self.generator.generate.remote(c) for c in job.chunks(self.max_batch_size)])
        finally:
            self.pending -= 1
        outputs = [o for part in parts for o in part]
        failed = [row["seed"] for row, o in zip(job.rows, outputs) if o is None]
        if failed:  # the model overflowed (see sdbatch.model.pipeline.NonFiniteError): no black images
            raise RequestError("seed", f"the images of seeds {failed} came out non-finite (NaN or inf), also "
                               "in float32: this model overflows with these settings", status=500)
        return answer(req, job, outputs, await self.model())

    async def progress(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/progress over all replicas: progress of the batches running now."""
        replicas = list((await self.board.snapshot.remote()).values())
        step, steps = sum(r["step"] for r in replicas), sum(r["steps"] for r in replicas)
        progress = step / steps if steps else 0.0
        started = min((r["started"] for r in replicas), default=time.time())
        elapsed = time.time() - started
        return {"progress": progress, "eta_relative": elapsed / progress - elapsed if progress else 0.0,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                          "job": f"{len(replicas)} batches" if replicas else "", "job_count": self.pending,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
                          "job_no": 0, "sampling_step": step, "sampling_steps": steps},
                "current_image": None, "textinfo": None}


def _arg(args: dict[str, Any], name: str, kind, default):
    value = args.get(name, default)
    try:
        return default if value is None else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"serve argument {name}={value!r}: expected {kind.__name__}") from None


def _flag(args: dict[str, Any], name: str) -> bool:
    value = args.get(name) or False
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ValueError(f"serve argument {name}={value!r}: expected true or false")
    return value


def safeguard_settings(args: dict[str, Any]) -> SafeguardSettings:
    """The SafeguardSettings of build()'s args (`SAFEGUARD_ARGS`; local paths made absolute, as the
    replicas may run in another folder), checked as `jobs run` checks them: raises ValueError
    (BlocklistError, CheckpointError, ProvenanceError) naming the bad file or argument."""
    def where(name):
        value = args.get(name)
        return None if not value else str(value) if "://" in str(value) else os.path.abspath(str(value))

    names = argparse.Namespace(**{k: where(k) for k in SAFEGUARD_ARGS if k != "no_watermark"},
                               no_watermark=_flag(args, "no_watermark"))
    settings = SafeguardSettings.from_args(names)
    settings.check()
    return settings


def build(args: dict[str, Any]):
    """The application for `serve run sdbatch.serve.app:build model=...` and serve config files.

    Replicas and their resources come from the cluster as for `jobs run` (`sdbatch.jobs.common.
    actor_pool`): one per GPU, or CPU replicas whose torch threads add up to the CPUs; with
    replicas=auto, Serve autoscales between 1 and what the cluster has or can add (64 when its
    autoscaler does not say). Raises ValueError for a missing model, a local model path that does
    not exist, a bad argument, or a safeguard file that cannot be used (see `safeguard_settings`).
    """
    import ray

    from sdbatch.builtin import builtin_path, is_builtin
    from sdbatch.jobs.common import actor_pool

    if not args.get("model"):
        raise ValueError("serve: the model argument is required (model=path/to/checkpoint)")
    if is_builtin(args["model"]):
        builtin_path(args["model"])  # a BuiltinModelError (ValueError) names an unknown or missing one
    elif "://" not in str(args["model"]) and not os.path.exists(args["model"]):
        raise ValueError(f"serve: model {args['model']} does not exist")
    replicas = args.get("replicas")
    if replicas is not None and str(replicas) != "auto" and not (str(replicas).isdigit() and int(replicas) >= 1):
        raise ValueError(f"serve argument replicas={replicas!r}: expected a positive integer or 'auto'")
    safeguards = safeguard_settings(args)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    pool = actor_pool(None if replicas is None else str(replicas), None)
    max_batch_size = _arg(args, "max_batch_size", int, 8 if pool.num_gpus else 4)
    defaults = dataclasses.asdict(Limits())
    limits = Limits(**{k: _arg(args, k, int, v) for k, v in defaults.items()})
    scaling = ({"num_replicas": pool.min_size} if pool.min_size == pool.max_size else
               {"autoscaling_config": {"min_replicas": pool.min_size, "max_replicas": pool.max_size or 64,
                                       "target_ongoing_requests": 2 * max_batch_size}})
    generator = Generator.options(
        ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}, **scaling,
    ).bind(str(args["model"]), dtype=str(args.get("dtype", "auto")), device="auto" if pool.num_gpus else "cpu",
           threads=pool.threads, max_batch_size=max_batch_size,
           batch_wait_timeout_s=_arg(args, "batch_wait_timeout_s", float, 0.05), safeguards=safeguards)
    return Ingress.bind(generator, max_batch_size=max_batch_size, limits=limits, safeguards=safeguards)
