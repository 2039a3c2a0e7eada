"""The family registry is the only place families differ: every entry has everything a family needs.

A new family is one registry entry plus one tiny pipeline; these tests then check it everywhere a
family is used — its tiny model builds and is detected as itself, its real-size reference layout
builds, and its conditioner, key names, objective, block layout, file evidence and single-file
types all exist and agree with each other.
"""

from __future__ import annotations

import re

import diffusers
import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.families import (
    FAMILIES,
    Conditioning,
    KohyaNames,
    Objective,
    detect_family,
    detect_variant,
    tiny_models,
)
from diffusion_lora.formats.family_guess import guess_families
from diffusion_lora.models.reference import reference_keys
from diffusion_lora.training.conditioning import Conditioner, SizeInfo, conditioner_for

NAMES = tuple(FAMILIES)
TINY = tuple(tiny_models())
VARIANTS = tuple((f.name, v.name) for f in FAMILIES.values() for v in f.all_variants)


@pytest.fixture(scope="module")
def tiny_pipes():
    return {}


def _tiny(tiny_pipes, name):
    if name not in tiny_pipes:
        tiny_pipes[name] = dl.build_tiny_pipeline(name)
    return tiny_pipes[name]


@pytest.mark.parametrize("tiny", TINY)
def test_tiny_model_is_detected_as_its_family_and_variant(tiny_pipes, tiny):
    family, variant = tiny_models()[tiny]
    pipe = _tiny(tiny_pipes, tiny)
    assert detect_family(pipe) is family
    assert detect_variant(pipe).name == variant.name
    assert type(pipe).__name__ == variant.tiny.pipeline
    assert type(getattr(pipe, family.denoiser)).__name__ == family.denoiser_class
    for component in family.text_encoders:
        assert getattr(pipe, component, None) is not None, f"{tiny}: tiny pipeline has no {component}"


def test_every_family_has_a_tiny_model_and_variant_names_are_unique():
    names = [v.name for _, v in (tiny_models().values())]
    assert len(names) == len(set(names))
    assert all(f.tiny_model in tiny_models() for f in FAMILIES.values())
    every = [name for _, name in VARIANTS]
    assert len(every) == len(set(every))


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_reference_layout_has_the_families_components_and_only_it_matches(name, variant):
    family = FAMILIES[name]
    reference = family.variant(variant).reference
    assert {spec.name for spec in reference} == {family.denoiser, *family.text_encoders}
    denoiser_spec = next(spec for spec in reference if spec.name == family.denoiser)
    assert denoiser_spec.cls == family.denoiser_class
    keys = reference_keys(name, variant)
    assert keys.family is family
    # the published denoiser's config selects this family and no other of the same class
    config = dict(keys.denoiser_config)
    matching = [
        f.name for f in FAMILIES.values() if f.denoiser_class == family.denoiser_class and f.matches_config(config)
    ]
    assert matching == [name]
    # ... and this variant, unless only the pipeline class tells it apart (Kontext's config is Flux.1-dev's)
    own = family.variant(variant)
    if own.matches_config is not None or variant == name:
        assert family.variant_of("", config).name == variant


@pytest.mark.parametrize("name", NAMES)
def test_every_lora_target_of_the_reference_denoiser_is_in_a_block(name):
    family = FAMILIES[name]
    paths = reference_keys(name).module_paths[family.denoiser]
    targets = [p for p in paths if p.endswith(family.targets("attn"))]
    assert targets, f"{name}: the attn preset targets nothing in the reference denoiser"
    outside = [p for p in targets if family.block_of(p) is None]
    assert outside == []
    groups = {family.block_of(p)[0] for p in targets}
    assert groups == {g.name for g in family.block_groups}


@pytest.mark.parametrize("tiny", TINY)
def test_conditioner_objective_and_scheduler_agree(tiny_pipes, tiny):
    family, variant = tiny_models()[tiny]
    pipe = _tiny(tiny_pipes, tiny)
    conditioner = conditioner_for(family, variant)
    assert isinstance(conditioner, Conditioner)
    # the conditioner drives this family's denoiser: a prediction shaped like the noisy latents
    text = conditioner.encode_text(pipe, ["a red square"], torch.device("cpu"))
    channels = pipe.vae.config.latent_channels  # the VAE's own latents; the conditioner maps them
    g = torch.Generator().manual_seed(0)
    noisy = conditioner.latents(pipe.vae, torch.zeros(1, channels, 16, 16), torch.ones(1, channels, 16, 16), g)
    size = SizeInfo((64, 64), (0, 0), (64, 64))
    with torch.no_grad():
        denoiser = getattr(pipe, family.denoiser)
        pred = conditioner.predict(pipe, denoiser, noisy, torch.tensor([500.0]), text, [size], 3.5)
    assert pred.shape == noisy.shape and torch.isfinite(pred).all()
    scheduler = pipe.scheduler
    if family.objective is Objective.FLOW_MATCHING:
        assert isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
        assert family.dynamic_shift == bool(scheduler.config.get("use_dynamic_shifting", False))
    else:
        assert scheduler.config.prediction_type == family.objective.value
        assert not family.dynamic_shift


def test_every_conditioning_has_its_own_conditioner_and_is_used():
    assert len(set(Conditioning)) == len(Conditioning.__members__)
    used = [(v.conditioning, f, v) for f in FAMILIES.values() for v in f.all_variants]
    assert {c for c, _, _ in used} == set(Conditioning)
    first = {c: (f, v) for c, f, v in reversed(used)}
    assert len({type(conditioner_for(f, v)) for f, v in first.values()}) == len(Conditioning)
    assert {f.kohya_names for f in FAMILIES.values()} == set(KohyaNames)


@pytest.mark.parametrize("name", NAMES)
def test_kohya_names_of_every_target_resolve_back_to_it(name):
    family = FAMILIES[name]
    keys = reference_keys(name)
    if family.kohya_names is KohyaNames.BFL:  # BFL names come from flux_names' tables (test_flux_names)
        assert (keys.flux_dims.num_double_blocks, keys.flux_dims.num_single_blocks) == (19, 38)
        return
    sgm = family.kohya_names is KohyaNames.SGM
    index = keys.kohya
    checked = 0
    for component in family.kohya_prefixes:
        for path in keys.module_paths.get(component, ()):
            if path.endswith(family.targets("attn")) or path.endswith(family.text_encoder_targets):
                written = index.name_of(component, path, sgm=sgm)
                assert written.startswith(family.kohya_prefixes[component] + "_")
                assert index.resolve(written) == (component, path)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", NAMES)
def test_key_evidence_points_to_the_family(name):
    family = FAMILIES[name]
    for pattern in family.key_evidence:
        re.compile(pattern)
    keys = reference_keys(name)
    modules = [f"{c}.{p}" for c, paths in keys.module_paths.items() for p in paths]
    guess = guess_families(modules)
    assert name in guess, f"{name}: its own reference keys point to {sorted(guess)}"


def test_single_file_types_and_kohya_versions_are_unique_and_real():
    seen_types: dict[str, str] = {}
    versions: dict[str, str] = {}
    for family in FAMILIES.values():
        for model_type, pipeline in family.single_file_types.items():
            assert model_type not in seen_types, f"{model_type}: {seen_types.get(model_type)} and {family.name}"
            seen_types[model_type] = family.name
            assert hasattr(diffusers, pipeline), pipeline
        written = {v.kohya_base_model_version for v in family.all_variants}
        for version in (*sorted(written), *family.kohya_version_aliases):
            assert version not in versions
            versions[version] = family.name
        assert family.tiny_model in dl.TINY_MODELS
    assert set(dl.TINY_MODELS) == set(tiny_models())
