"""The AUTOMATIC1111 web API (``/sdapi/v1/*``) on the engine, so existing A1111 clients work unchanged.

Request and response shapes follow A1111's ``modules/api``: ``txt2img`` takes the prompt with
``<lora:NAME:W>`` tags and answers ``{"images": [base64 PNG], "parameters": {request}, "info": "<JSON>"}``;
fields A1111 would ignore here are ignored, and fields that would change the image in a way this server
cannot do (hires fix, init images, scripts, variation seeds, styles, …) are refused with 422 naming the
field, rather than silently giving another image than A1111 would.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import Body, FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError
from ..models.samplers import api_samplers, api_schedulers
from ..prompt_tags import parse_lora_tags
from ..version import __version__
from .context import ServerContext, png_base64, random_seed
from .jobs import Job

__all__ = ["Txt2ImgRequest", "add_a1111_routes", "sampler_items", "scheduler_items"]


# -- samplers ---------------------------------------------------------------------------------------------

def sampler_items(pipe: Any) -> list[dict[str, Any]]:
    """A1111's SamplerItem entries ({name, aliases, options}) for the samplers this model can run."""
    return api_samplers(pipe)


def scheduler_items(pipe: Any) -> list[dict[str, Any]]:
    """A1111's SchedulerItem entries ({name, label, aliases, default_rho, need_inner_model}) for this model."""
    return api_schedulers(pipe)


# -- txt2img ---------------------------------------------------------------------------------------------

class Txt2ImgRequest(BaseModel):
    """A1111's ``StableDiffusionProcessingTxt2Img`` request. Fields not listed are accepted and ignored, as
    A1111 ignores the ones its processing does not use. Omitted size, CFG scale and sampler take the
    model's own defaults."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random (the seed used is in info.seed)")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="A1111's older name of sampler_name")
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=10_000)
    n_iter: int = Field(1, ge=1, le=10_000)
    steps: int = 20
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    styles: list[str] | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    refiner_checkpoint: str | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    init_images: list[Any] | None = None
    mask: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # every field of A1111's request model is Optional: clients send null for "the default"
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


def _unset(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == "" or value == "None" or value == [] \
        or value == {}


# (field, is the value one we honour?, why not otherwise)
_REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("enable_hr", _unset, "hires fix is not supported by this server; generate at the final size"),
    ("init_images", _unset, "txt2img takes no init images (this server has no img2img)"),
    ("mask", _unset, "txt2img takes no mask"),
    ("firstpass_image", _unset, "a first-pass image is not supported"),
    ("script_name", _unset, "scripts are not supported by this server"),
    ("script_args", _unset, "scripts are not supported by this server"),
    ("alwayson_scripts", _unset, "scripts (ControlNet, ADetailer, …) are not supported by this server"),
    ("subseed_strength", _unset, "variation seeds are not supported; leave it 0"),
    ("seed_resize_from_h", lambda v: v is None or v <= 0, "seed resize is not supported"),
    ("seed_resize_from_w", lambda v: v is None or v <= 0, "seed resize is not supported"),
    ("restore_faces", _unset, "face restoration is not supported by this server"),
    ("tiling", _unset, "tiling is not supported by this server"),
    ("refiner_checkpoint", _unset, "a refiner is not supported by this server"),
    ("styles", _unset, "styles are not stored on this server; put their text in the prompt"),
    ("save_images", _unset, "this server does not save images; they come back in the response"),
)


def check_supported(body: Txt2ImgRequest, ctx: ServerContext) -> None:
    """Refuse (ConfigError → 422) the first field whose value this server cannot honour."""
    for key, honoured, why in _REFUSED:
        if not honoured(getattr(body, key)):
            raise ConfigError(f"{key}: {why}")
    _check_options(body.override_settings or {}, ctx, "override_settings")


def _check_options(options: dict[str, Any], ctx: ServerContext, where: str) -> None:
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            if value not in _model_titles(ctx):
                raise ConfigError(f"{where}.sd_model_checkpoint: this server serves only {_title(ctx)!r} and "
                                  f"cannot switch to {value!r}; start a server for that model")
            continue
        raise ConfigError(f"{where}.{key}: options cannot be changed on this server")


def _title(ctx: ServerContext) -> str:
    return f"{ctx.model_name} [{ctx.model_hash}]" if ctx.model_hash else ctx.model_name


def _model_titles(ctx: ServerContext) -> set[str]:
    return {_title(ctx), ctx.model_name}


def job_of(body: Txt2ImgRequest, seed: int) -> Job:
    prompt = body.prompt
    if body.disable_extra_networks:  # A1111: the tags are removed and no adapter applies
        prompt, _ = parse_lora_tags(prompt)
    return Job(prompt, body.negative_prompt, steps=body.steps, guidance=body.cfg_scale, width=body.width,
               height=body.height, seed=seed, count=body.batch_size * body.n_iter,
               sampler=body.sampler_name or body.sampler_index, scheduler=body.scheduler)


_FIELD = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext_fields(text: str) -> dict[str, str]:
    """The ``Key: value`` pairs of an infotext's last line."""
    return {key.strip(): value.strip() for key, value in _FIELD.findall(text.rsplit("\n", 1)[-1])}


def _info(body: Txt2ImgRequest, job: Job, infotexts: list[str], ctx: ServerContext) -> dict[str, Any]:
    fields = infotext_fields(infotexts[0]) if infotexts else {}
    height, width = ctx.engine.size_of(job)
    cfg = fields.get("CFG scale")
    subseed = body.subseed if body.subseed >= 0 else random_seed()
    count = job.count
    return {
        "prompt": body.prompt, "all_prompts": [body.prompt] * count,
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * count,
        "seed": job.seed, "all_seeds": [job.seed + i for i in range(count)],
        "subseed": subseed, "all_subseeds": [subseed + i for i in range(count)], "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": fields.get("Sampler"),
        "cfg_scale": float(cfg) if cfg is not None else body.cfg_scale, "steps": job.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": ctx.model_name, "sd_model_hash": ctx.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {k: v.strip('"') for k, v in fields.items() if k == "Lora hashes"},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": f"diffusion-lora {__version__}",
    }


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs with the 'parameters' text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: all_prompts, all_seeds, infotexts, seed, … as A1111 gives them")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


def add_a1111_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Register the ``/sdapi/v1/*`` endpoints on ``app``."""

    @app.post("/sdapi/v1/txt2img", response_model=TextToImageResponse, tags=["a1111"])
    async def txt2img(body: Txt2ImgRequest) -> TextToImageResponse:
        check_supported(body, ctx)
        seed = random_seed() if body.seed == -1 else body.seed
        job = job_of(body, seed)
        result = await ctx.run(job)
        infotexts = [image.parameters for image in result.images]
        images = await asyncio.to_thread(png_base64, result) if body.send_images else []
        echo = {k: v for k, v in body.model_dump().items() if k not in (body.model_extra or {})}
        return TextToImageResponse(images=images, parameters=echo, info=json.dumps(_info(body, job, infotexts, ctx)))

    @app.get("/sdapi/v1/loras", tags=["a1111"])
    async def loras() -> list[dict[str, Any]]:
        return [vars(f) for f in await ctx.lora_index()]

    @app.post("/sdapi/v1/refresh-loras", tags=["a1111"])
    async def refresh_loras() -> None:
        """Read the folders' list again (a changed file is reloaded when next used, refreshed or not)."""
        await ctx.lora_index(refresh=True)
        return None

    @app.get("/sdapi/v1/sd-models", tags=["a1111"])
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": _title(ctx), "model_name": ctx.model_name, "hash": ctx.model_hash, "sha256": None,
                 "filename": ctx.engine.model_file or ctx.model_name, "config": None}]

    @app.get("/sdapi/v1/options", tags=["a1111"])
    async def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": _title(ctx), "sd_checkpoint_hash": None, "samples_format": "png"}

    @app.post("/sdapi/v1/options", tags=["a1111"])
    async def set_options(options: dict[str, Any] = Body(...)) -> None:  # noqa: B008 - FastAPI's idiom
        """Only a no-op is accepted: the server serves one model and has no settings to change."""
        _check_options(options, ctx, "options")
        return None

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["a1111"])
    async def progress() -> ProgressResponse:
        p = ctx.engine.progress()
        share = p["step"] / p["steps"] if p["steps"] else 0.0
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": p["queued"] + p["running"], "job_timestamp": "0", "job_no": 0,
                 "sampling_step": p["step"], "sampling_steps": p["steps"]}
        text = f"{p['running']} images running, {p['queued']} waiting" if p["running"] or p["queued"] else None
        # A1111's estimate: time so far / share done − time so far (the running batch's remaining seconds)
        eta = p["elapsed"] / share - p["elapsed"] if share > 0 else 0.0
        return ProgressResponse(progress=share, eta_relative=eta, state=state, textinfo=text)

    @app.get("/sdapi/v1/samplers", tags=["a1111"])
    async def samplers() -> list[dict[str, Any]]:
        return sampler_items(ctx.engine.pipe)

    @app.get("/sdapi/v1/schedulers", tags=["a1111"])
    async def schedulers() -> list[dict[str, Any]]:
        return scheduler_items(ctx.engine.pipe)
