"""A1111 sampler names → diffusers schedulers: the docs' mapping, generation with each, the CLI against plain
diffusers, the pipeline's scheduler restored, refusals, flow-matching models, and per-request noise in a batch."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.errors import ConfigError, RequestLimitError
from diffusion_lora.generate import GenerationSettings, generate
from diffusion_lora.models.samplers import api_samplers, api_schedulers, choose, infotext_fields, swapped_scheduler
from diffusion_lora.serve import Engine, Job

from .helpers import randomize

SCIPY = importlib.util.find_spec("scipy") is not None

# diffusers docs, api/schedulers/overview.md, "A1111/k-diffusion | Diffusers | Usage" and "Noise schedules and
# schedule types", written out by hand: (sampler, scheduler) → (class, init values). The bare names are given
# with schedule type Uniform (the model's own sigmas), which is what the docs' plain rows mean; A1111 1.10's
# Automatic for DPM++ 2M / DPM2 is Karras and for DPM++ 2M SDE Exponential (the rows after these).
K, E = "use_karras_sigmas", "use_exponential_sigmas"
DOCS = [
    ("DPM++ 2M", "Uniform", "DPMSolverMultistepScheduler", {K: False, "algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M Karras", None, "DPMSolverMultistepScheduler", {K: True, "algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M SDE", "Uniform", "DPMSolverMultistepScheduler", {K: False, "algorithm_type": "sde-dpmsolver++"}),
    ("DPM++ 2M SDE Karras", None, "DPMSolverMultistepScheduler", {K: True, "algorithm_type": "sde-dpmsolver++"}),
    ("DPM++ SDE", "Uniform", "DPMSolverSinglestepScheduler", {K: False}),
    ("DPM++ SDE Karras", None, "DPMSolverSinglestepScheduler", {K: True}),
    ("DPM2", "Uniform", "KDPM2DiscreteScheduler", {K: False}),
    ("DPM2 Karras", None, "KDPM2DiscreteScheduler", {K: True}),
    ("DPM2 a", "Uniform", "KDPM2AncestralDiscreteScheduler", {K: False}),
    ("DPM2 a Karras", None, "KDPM2AncestralDiscreteScheduler", {K: True}),
    ("Euler", None, "EulerDiscreteScheduler", {K: False}),
    ("Euler a", None, "EulerAncestralDiscreteScheduler", {}),
    ("Heun", None, "HeunDiscreteScheduler", {K: False}),
    ("DDIM", None, "DDIMScheduler", {}),
    ("PLMS", None, "PNDMScheduler", {"skip_prk_steps": True}),
    ("UniPC", None, "UniPCMultistepScheduler", {}),
    ("LCM", None, "LCMScheduler", {}),
    # schedule types
    ("Euler", "Karras", "EulerDiscreteScheduler", {K: True}),
    ("Euler", "Exponential", "EulerDiscreteScheduler", {E: True, "timestep_spacing": "linspace"}),
    ("Euler", "SGM Uniform", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("Euler", "Simple", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("DDIM", "SGM Uniform", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    # A1111 1.10's Automatic, and its aliases (lower-case names too)
    ("DPM++ 2M", None, "DPMSolverMultistepScheduler", {K: True, "algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M SDE", "Automatic", "DPMSolverMultistepScheduler", {E: True, "timestep_spacing": "linspace"}),
    ("DPM2 a", None, "KDPM2AncestralDiscreteScheduler", {K: True}),
    ("k_euler_a", None, "EulerAncestralDiscreteScheduler", {}),
    ("k_dpmpp_2m_ka", None, "DPMSolverMultistepScheduler", {K: True, "algorithm_type": "dpmsolver++"}),
    ("dpm++ 2m karras", None, "DPMSolverMultistepScheduler", {K: True}),
    ("k_dpmpp_2m", "karras", "DPMSolverMultistepScheduler", {K: True}),
    ("euler", "sgm_uniform", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("DPM++ 2M SDE Heun", "Uniform", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
]
# the model's keys: a v-prediction model with trailing timesteps, whose own scheduler is a third-order SDE
# DPM-Solver with Karras sigmas (none of that solver choice may leak into another sampler)
MODEL = {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "steps_offset": 1}


@pytest.fixture(scope="module")
def pipe():
    p = dl.build_tiny_pipeline("tiny-sd15")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("sampler,scheduler,cls,expected", DOCS)
def test_each_name_builds_the_docs_class_on_the_models_config(pipe, sampler, scheduler, cls, expected):
    base = DPMSolverMultistepScheduler(**MODEL, timestep_spacing="trailing", algorithm_type="sde-dpmsolver++",
                                       solver_order=3, use_karras_sigmas=True)
    built = choose(pipe, sampler, scheduler, base=base).build(base)
    assert type(built).__name__ == cls
    for key, value in {"timestep_spacing": "trailing", **MODEL, **expected}.items():
        if key in built.config or key in expected:
            assert built.config[key] == value, key
    if "solver_order" in built.config:
        assert built.config.solver_order == 2  # 2M / UniPC's default, not the model's third order
    assert base.config.solver_order == 3 and base.config.use_karras_sigmas  # the model's scheduler is untouched


def test_infotext_names_resolve_back_to_the_same_scheduler(pipe):
    for sampler, scheduler, _, _ in DOCS:
        name, schedule = infotext_fields(pipe, sampler, scheduler)
        again, first = choose(pipe, name, schedule), choose(pipe, sampler, scheduler)
        assert (again.scheduler, dict(again.config)) == (first.scheduler, dict(first.config)), sampler


def test_names_without_diffusers_equivalent_are_refused_with_the_models_samplers(pipe):
    for name in ("DPM adaptive", "Restart", "DPM fast", "DPM++ 2S a", "DDIM CFG++"):
        with pytest.raises(ConfigError, match=re.escape(repr(name)) + ".*Euler a.*UniPC"):
            choose(pipe, name)
    with pytest.raises(ConfigError, match="unknown.*Euler a"):
        choose(pipe, "Euler b")
    with pytest.raises(ConfigError, match="unknown schedule type.*Karras"):
        choose(pipe, "Euler", "Karas")
    with pytest.raises(ConfigError, match="DDIM.*Karras.*schedule types.*SGM Uniform"):
        choose(pipe, "DDIM", "Karras")
    with pytest.raises(ConfigError, match="Karras.*Exponential"):
        choose(pipe, "DPM++ 2M Karras", "Exponential")
    assert choose(pipe, "", "") is None and choose(pipe, None, "Automatic") is None  # the model's own, as A1111
    if not SCIPY:  # diffusers' LMS scheduler and beta sigmas import scipy
        with pytest.raises(ConfigError, match="LMS.*scipy"):
            choose(pipe, "LMS")


def test_api_lists_only_what_this_model_runs(pipe):
    samplers = {e["name"]: e for e in api_samplers(pipe)}
    assert samplers["Euler a"] == {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"],
                                   "options": {"uses_ensd": True}}
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert {"Euler", "DDIM", "UniPC", "LCM", "PLMS", "DPM++ 2M SDE"} <= set(samplers)
    assert not {"DPM adaptive", "Restart", "DPM fast"} & set(samplers)
    schedulers = {e["label"]: e for e in api_schedulers(pipe)}
    assert schedulers["Karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                    "need_inner_model": False}
    assert schedulers["SGM Uniform"]["aliases"] == ["SGMUniform"]
    assert "Polyexponential" not in schedulers and "Automatic" in schedulers


def test_generate_with_each_sampler_names_it_in_the_png(pipe):
    own = pipe.scheduler
    seen = {}
    for entry in api_samplers(pipe):
        settings = GenerationSettings(prompts=["a red circle"], steps=2, height=32, width=32, guidance=1.0,
                                      sampler=entry["aliases"][0])  # by alias: the PNG still says the name
        (image,) = generate(pipe, settings, progress=False)
        fields = image.parameters.split("\n")[-1]
        assert f"Sampler: {entry['name']}, " in fields
        if entry["options"].get("scheduler"):
            assert f"Schedule type: {entry['options']['scheduler'].capitalize()}, " in fields
        assert np.asarray(image.image).std() > 0
        seen[entry["name"]] = np.asarray(image.image)
        assert pipe.scheduler is own
    assert not np.array_equal(seen["Euler a"], seen["DDIM"])  # the sampler really changed


def test_cli_euler_a_equals_plain_diffusers(pipe, tmp_path):
    args = ["generate", "--model", "tiny-sd15", "--prompt", "a blue square", "--steps", "3", "--height", "32",
            "--width", "32", "--seed", "7", "--sampler", "Euler a", "--out", str(tmp_path)]
    assert main(args) == 0
    png = Image.open(next(tmp_path.glob("*.png")))
    assert "Steps: 3, Sampler: Euler a, CFG scale" in png.text["parameters"]
    reference = dl.build_tiny_pipeline("tiny-sd15")
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    with torch.no_grad():
        plain = reference(prompt="a blue square", num_inference_steps=3, height=32, width=32,
                          generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(plain))


def test_pipeline_scheduler_is_restored_after_an_error(pipe):
    own, config = pipe.scheduler, dict(pipe.scheduler.config)

    def fail(*_):
        raise RuntimeError("denoiser failed")

    hook = pipe.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="denoiser failed"):
            generate(pipe, GenerationSettings(prompts=["x"], steps=2, height=32, width=32, sampler="DPM++ 2M SDE"),
                     progress=False)
    finally:
        hook.remove()
    assert pipe.scheduler is own and isinstance(own, DDIMScheduler) and dict(own.config) == config


def test_cli_refuses_unknown_and_unmapped_samplers(tmp_path, capsys):
    base = ["generate", "--model", "tiny-sd15", "--prompt", "x", "--steps", "1", "--out", str(tmp_path)]
    for argv, words in ((["--sampler", "Eular a"], "unknown; A1111's samplers are DPM++ 2M"),
                        (["--sampler", "Euler", "--scheduler", "Fast"], "unknown schedule type"),
                        (["--sampler", "DPM adaptive"], "no diffusers equivalent; samplers for")):
        assert main(base + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not list(tmp_path.glob("*.png"))


def test_flow_matching_model_gets_euler_and_refuses_sd_samplers():
    flow = dl.build_tiny_pipeline("tiny-sd3")
    own = flow.scheduler
    assert [e["name"] for e in api_samplers(flow)] == ["Euler"]
    built = choose(flow, "Euler").build(own)
    assert isinstance(built, FlowMatchEulerDiscreteScheduler)
    assert dict(built.config) == dict(own.config)  # its shift and resolution-dependent shift are the model's
    for name in ("Euler a", "DPM++ 2M", "DDIM", "UniPC"):
        refused = re.escape(repr(name)) + " has no diffusers scheduler for flow-matching.*: Euler$"
        with pytest.raises(ConfigError, match=refused):
            choose(flow, name)
    with pytest.raises(ConfigError, match="Karras"):
        choose(flow, "Euler", "Karras")
    assert infotext_fields(flow, None, None) == ("Euler", None)


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2M SDE", "LCM"])
def test_stochastic_samplers_draw_each_samples_noise_from_its_own_generator(pipe, name):
    def latents(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad(), swapped_scheduler(pipe, choose(pipe, name).build(pipe.scheduler)):
            return pipe(prompts, num_inference_steps=2, height=32, width=32, guidance_scale=1.0,
                        generator=generators, output_type="latent").images

    both = latents(["a cat", "a dog"], [5, 9])
    alone = latents(["a dog"], [9])
    # batched arithmetic differs by ~1e-4; noise from another generator (or the global one) by ~1
    assert torch.allclose(both[1], alone[0], atol=1e-3)


# --- the engine: a stochastic sampler's noise comes from each request's own seed ----------------------------


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampler_loras")
    p = dl.build_tiny_pipeline("tiny-sd15")
    for i, name in enumerate(("chalk", "smoke")):
        dl.add_lora(p, name, rank=4, alpha=4)
        randomize(p, name, seed=80 + i, std=0.15)
        dl.save_lora(p, name, folder / f"{name}.safetensors")
    return folder


REQUESTS = [("a red circle <lora:chalk:0.8>", 21), ("a blue square <lora:smoke:1>", 22), ("a green triangle", 23)]


def test_engine_batch_with_euler_a_equals_each_request_alone(lora_dir, tmp_path):
    engine_pipe = dl.build_tiny_pipeline("tiny-sd15")
    with Engine(engine_pipe, [str(lora_dir)], max_batch=8, batch_window=0.5) as engine:
        with pytest.raises(RequestLimitError, match="DPM adaptive"):
            engine.submit(Job("x", sampler="DPM adaptive"))
        futures = [engine.submit(Job(p, steps=3, width=32, height=32, seed=s, sampler="Euler a"))
                   for p, s in REQUESTS]
        results = [f.result(timeout=300) for f in futures]
        assert engine.batches == 1
    assert isinstance(engine_pipe.scheduler, DDIMScheduler)
    worst = 0
    for (prompt, seed), result in zip(REQUESTS, results):
        out = tmp_path / str(seed)
        assert main(["generate", "--model", "tiny-sd15", "--prompt", prompt, "--steps", "3", "--height", "32",
                     "--width", "32", "--seed", str(seed), "--sampler", "Euler a", "--lora-dir", str(lora_dir),
                     "--out", str(out)]) == 0
        png = Image.open(next(out.glob("*.png")))
        served = np.asarray(result.images[0].image.convert("RGB")).astype(int)
        worst = max(worst, int(np.abs(served - np.asarray(png.convert("RGB")).astype(int)).max()))
        assert result.images[0].parameters == png.text["parameters"]
        assert "Sampler: Euler a," in png.text["parameters"]
    assert worst <= 1
