"""The ingress's HTTP routes: AUTOMATIC1111's /sdapi/v1/ endpoints, with the Gradio page mounted at `/`."""

from __future__ import annotations

from typing import Any

from sdbatch.serve.a1111_api import (Img2ImgRequest, RequestError, SCHEDULERS, Txt2ImgRequest, samplers_list,
                                     schedulers_list)


def build_asgi_app(ingress):
    """FastAPI app whose routes call `ingress` (an `sdbatch.serve.app.Ingress`): run(request),
    progress(), model(). Bad requests get a 4xx JSON body naming the field (FastAPI's
    `{"detail": [{"loc": ["body", field], "msg": ...}]}`), never a 500."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from sdbatch.serve.page import build_page, mount_page

    app = FastAPI(title="sdbatch: AUTOMATIC1111-compatible API", docs_url="/docs")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.detail(), status_code=exc.status)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest) -> dict[str, Any]:
        return await ingress.run(req)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest) -> dict[str, Any]:
        return await ingress.run(req)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return samplers_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return schedulers_list()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        m = await ingress.model()
        return [{"title": m["title"], "model_name": m["model_name"], "hash": m["hash"][:10], "sha256": m["hash"],
                 "filename": m["filename"], "config": None}]

    @app.get("/sdapi/v1/options")
    async def options() -> dict[str, Any]:
        m = await ingress.model()
        return {"sd_model_checkpoint": m["title"], "sd_checkpoint_hash": m["hash"], "samples_format": "png",
                "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_ancestral": 1.0, "eta_ddim": 0.0,
                "s_churn": 0.0, "s_noise": 1.0, "s_tmin": 0.0, "s_min_uncond": 0.0,
                "sdbatch_device": m["device"], "sdbatch_dtype": m["dtype"],
                "sdbatch_max_batch_size": ingress.max_batch_size, "sdbatch_schedulers": list(SCHEDULERS.values()),
                **{f"sdbatch_{k}": v for k, v in vars(ingress.limits).items()}}

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        return await ingress.progress()

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    return mount_page(app, build_page(ingress))
