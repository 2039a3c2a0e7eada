"""AUTOMATIC1111's sampler names and schedule types, mapped to diffusers schedulers built from the model's own config.

A1111 (1.10) names a sampling method by a *sampler* (``Euler a``, ``DPM++ 2M``, …, or an alias such as
``k_euler_a``) and a *schedule type* (``Automatic``, ``Karras``, ``Exponential``, …); older versions
joined them (``DPM++ 2M Karras``), and A1111 still reads those names. ``Automatic`` is the sampler's own
default schedule in A1111 (``DPM++ 2M`` → Karras, ``DPM++ 2M SDE`` → Exponential, ``DPM2`` → Karras) and
the model's own schedule for the others; ``Uniform`` is always the model's own.

A scheduler is built with the chosen diffusers class from the pipeline's scheduler config, so the
prediction type, betas, timestep spacing and shift stay the model's; only the keys that define the
solver (``algorithm_type``, ``solver_order``, …) and the sigma schedule (``use_karras_sigmas``, …) are
the sampler's. The mapping follows the table in diffusers' scheduler docs. Flow-matching models (the
family's objective) get only the samplers that are correct for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import diffusers

from ..errors import ConfigError
from ..families import detect_family
from ..families.kinds import Objective

__all__ = ["SAMPLERS", "SCHEDULES", "Choice", "api_samplers", "api_schedulers", "available_samplers", "choose",
           "current_choice", "infotext_fields", "parse_names", "swapped_scheduler"]


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its name, aliases and options (as A1111's API lists them) and its diffusers scheduler
    (``scheduler`` None: diffusers has no equivalent), with the config keys that define it."""

    name: str
    aliases: tuple[str, ...]
    options: Mapping[str, Any]
    scheduler: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=_frozen)
    needs: str | None = None  # an optional library diffusers needs for this scheduler

    @property
    def default_schedule(self) -> str | None:
        """A1111's schedule for ``Automatic`` (a schedule name), None: the model's own."""
        return self.options.get("scheduler")


_DPM = "DPMSolverMultistepScheduler"
_2M = _frozen(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
_2M_SDE = _frozen(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint")
_KARRAS, _EXP = _frozen(scheduler="karras"), _frozen(scheduler="exponential")

# A1111 1.10's samplers, in its order (sd_samplers_kdiffusion, sd_samplers_timesteps, sd_samplers_lcm), and
# the diffusers scheduler of each (diffusers docs, "Schedulers" overview table).
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), _KARRAS, _DPM, _2M),
    # diffusers' table maps DPM++ SDE to its single-step DPM-Solver++ (deterministic; no Brownian noise)
    Sampler("DPM++ SDE", ("k_dpmpp_sde",), _frozen(scheduler="karras", second_order=True, brownian_noise=True),
            "DPMSolverSinglestepScheduler", _2M),
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), _frozen(scheduler="exponential", brownian_noise=True), _DPM,
            _2M_SDE),
    Sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
            _frozen(scheduler="exponential", brownian_noise=True, solver_type="heun"), _DPM,
            _frozen(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun")),
    Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), _frozen(scheduler="karras", uses_ensd=True, second_order=True)),
    Sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
            _frozen(scheduler="exponential", discard_next_to_last_sigma=True, brownian_noise=True)),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), _frozen(uses_ensd=True), "EulerAncestralDiscreteScheduler"),
    Sampler("Euler", ("k_euler",), _frozen(), "EulerDiscreteScheduler"),
    Sampler("LMS", ("k_lms",), _frozen(), "LMSDiscreteScheduler", needs="scipy"),
    Sampler("Heun", ("k_heun",), _frozen(second_order=True), "HeunDiscreteScheduler"),
    Sampler("DPM2", ("k_dpm_2",), _frozen(scheduler="karras", discard_next_to_last_sigma=True, second_order=True),
            "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", ("k_dpm_2_a",), _frozen(scheduler="karras", discard_next_to_last_sigma=True, uses_ensd=True,
                                             second_order=True), "KDPM2AncestralDiscreteScheduler"),
    Sampler("DPM fast", ("k_dpm_fast",), _frozen(uses_ensd=True)),
    Sampler("DPM adaptive", ("k_dpm_ad",), _frozen(uses_ensd=True)),
    Sampler("Restart", ("restart",), _frozen(scheduler="karras", second_order=True)),
    Sampler("DDIM", ("ddim",), _frozen(), "DDIMScheduler"),
    Sampler("DDIM CFG++", ("ddim_cfgpp",), _frozen()),
    Sampler("PLMS", ("plms",), _frozen(), "PNDMScheduler", _frozen(skip_prk_steps=True)),
    Sampler("UniPC", ("unipc",), _frozen(), "UniPCMultistepScheduler"),
    Sampler("LCM", ("k_lcm",), _frozen(), "LCMScheduler"),
)

# Flow-matching models: the samplers whose diffusers scheduler integrates the model's flow with its own
# shift (and resolution-dependent shift). DPM++/UniPC with flow sigmas do not take the custom sigmas
# every flow pipeline passes, so they are refused rather than run with another schedule.
_FLOW = {"Euler": "FlowMatchEulerDiscreteScheduler"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One A1111 schedule type (``sd_schedulers``) and the diffusers init keys that give it (None: no equivalent)."""

    name: str
    label: str
    config: Mapping[str, Any] | None
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1.0
    need_inner_model: bool = False
    needs: str | None = None


SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic", _frozen()),
    Schedule("uniform", "Uniform", _frozen(), need_inner_model=True),  # the model's own timesteps
    Schedule("karras", "Karras", _frozen(use_karras_sigmas=True), default_rho=7.0),
    Schedule("exponential", "Exponential", _frozen(timestep_spacing="linspace", use_exponential_sigmas=True)),
    Schedule("polyexponential", "Polyexponential", None, default_rho=1.0),
    Schedule("sgm_uniform", "SGM Uniform", _frozen(timestep_spacing="trailing"), ("SGMUniform",),
             need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", None),
    Schedule("align_your_steps", "Align Your Steps", None),
    Schedule("simple", "Simple", _frozen(timestep_spacing="trailing"), need_inner_model=True),
    Schedule("normal", "Normal", None, need_inner_model=True),
    Schedule("ddim", "DDIM", None, need_inner_model=True),
    Schedule("beta", "Beta", _frozen(timestep_spacing="linspace", use_beta_sigmas=True), need_inner_model=True,
             needs="scipy"),
)

# Keys that choose a solver or a sigma schedule, not the model: a scheduler built for a sampler starts from the
# model's config without them, so the pipeline's own solver settings never leak into another sampler.
_SOLVER_KEYS = frozenset({
    "algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "use_lu_lambdas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "skip_prk_steps",
    "predict_x0", "disable_corrector",
})
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")

_BY_NAME = {s.name: s for s in SAMPLERS}
_SAMPLER_KEYS = {k.lower(): s for s in SAMPLERS for k in (s.name, *s.aliases)}
_SCHEDULE_KEYS = {k.lower(): s for s in SCHEDULES for k in (s.name, s.label, *(s.aliases or ()))}
# the aliases of A1111's older combined names (A1111 reads the names themselves by their schedule suffix)
_LEGACY_ALIASES = {
    "k_lms_ka": ("LMS", "karras"), "k_dpm_2_ka": ("DPM2", "karras"), "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"), "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"), "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "exponential"),
}
_MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class Choice:
    """A resolved sampler: A1111's sampler and schedule (``schedule`` None: the model's own) and the diffusers
    scheduler class and init keys that give it, on top of the model's scheduler config."""

    sampler: Sampler
    schedule: Schedule | None
    scheduler: str
    config: Mapping[str, Any]
    own_solver: bool = False  # keep the model config's solver and sigma keys (flow models: its own schedule)

    def build(self, base: Any) -> Any:
        """A new scheduler of this choice from ``base`` (the pipeline's own scheduler); ``base`` is untouched."""
        config = {k: v for k, v in dict(base.config).items() if self.own_solver or k not in _SOLVER_KEYS}
        return getattr(diffusers, self.scheduler).from_config(config, **self.config)

    @property
    def schedule_text(self) -> str | None:
        """A1111's ``Schedule type`` for the infotext: the schedule used, ``Uniform`` where A1111's
        ``Automatic`` would have meant another, None where there is nothing to say."""
        if self.schedule is not None:
            return self.schedule.label
        return "Uniform" if self.sampler.default_schedule else None


def parse_names(sampler: str | None, scheduler: str | None) -> tuple[Sampler | None, Schedule | None]:
    """(sampler, schedule) named by A1111 strings, case-insensitive, aliases and combined names (``DPM++ 2M
    Karras``, ``k_dpmpp_2m_ka``) included; None or "" → None (the model's own), ``Automatic`` → schedule None
    (the sampler's own). Unknown → ConfigError."""
    schedule = _schedule(scheduler)
    if sampler is None or isinstance(sampler, str) and not sampler.strip():  # A1111 reads "" as its default
        return None, schedule
    if not isinstance(sampler, str) or len(sampler) > _MAX_NAME:
        raise ConfigError(f"sampler must be a sampler name, got {str(sampler)[:_MAX_NAME]!r}")
    key = sampler.strip().lower()
    found, suffix = _SAMPLER_KEYS.get(key), None
    if found is None and key in _LEGACY_ALIASES:
        name, schedule_name = _LEGACY_ALIASES[key]
        found, suffix = _BY_NAME[name], _SCHEDULE_KEYS[schedule_name]
    if found is None:  # A1111's older names: the sampler followed by a schedule type
        for option, sched in _SCHEDULE_KEYS.items():
            if key.endswith(" " + option) and key[: -len(option) - 1].strip() in _SAMPLER_KEYS:
                found, suffix = _SAMPLER_KEYS[key[: -len(option) - 1].strip()], sched
                break
    if found is None:
        raise ConfigError(f"sampler {sampler!r}: unknown; A1111's samplers are "
                          f"{', '.join(s.name for s in SAMPLERS)} (or a name plus a schedule type, e.g. "
                          "'DPM++ 2M Karras')")
    if suffix is not None and suffix.name != "automatic":
        if schedule is not None and schedule is not suffix:
            raise ConfigError(f"sampler {sampler!r} names schedule type {suffix.label}, scheduler asks for "
                              f"{schedule.label}; give one of them")
        schedule = suffix
    return found, schedule


def _schedule(scheduler: str | None) -> Schedule | None:
    if scheduler is None or isinstance(scheduler, str) and not scheduler.strip():
        return None
    if not isinstance(scheduler, str) or len(scheduler) > _MAX_NAME:
        raise ConfigError(f"scheduler must be a schedule type name, got {str(scheduler)[:_MAX_NAME]!r}")
    found = _SCHEDULE_KEYS.get(scheduler.strip().lower())
    if found is None:
        raise ConfigError(f"scheduler {scheduler!r}: unknown schedule type; A1111's are "
                          f"{', '.join(s.label for s in SCHEDULES)}")
    return None if found.name == "automatic" else found


def _flow(pipe: Any) -> bool:
    return detect_family(pipe).objective is Objective.FLOW_MATCHING


def _missing(library: str | None) -> bool:
    return library is not None and importlib.util.find_spec(library) is None


def _init_keys(scheduler: str) -> frozenset[str]:
    return frozenset(inspect.signature(getattr(diffusers, scheduler).__init__).parameters)


def _why_not(pipe: Any, sampler: Sampler, schedule: Schedule | None) -> str | None:
    """Why ``sampler`` with ``schedule`` cannot run on ``pipe`` (None: it can)."""
    if _flow(pipe):
        if sampler.name not in _FLOW:
            return "has no diffusers scheduler for flow-matching models"
        if schedule is not None and schedule.name != "uniform":
            return f"with schedule type {schedule.label} has no diffusers equivalent for flow-matching models"
        return None
    if sampler.scheduler is None:
        return "has no diffusers equivalent"
    if _missing(sampler.needs):
        return f"needs {sampler.needs} (pip install {sampler.needs})"
    if schedule is not None:
        if schedule.config is None:
            return f"with schedule type {schedule.label}: diffusers has no equivalent schedule"
        if _missing(schedule.needs):
            return f"with schedule type {schedule.label} needs {schedule.needs} (pip install {schedule.needs})"
        if not set(schedule.config) <= _init_keys(sampler.scheduler):
            return f"with schedule type {schedule.label}: diffusers' {sampler.scheduler} has no such schedule"
    return None


def available_samplers(pipe: Any) -> list[Sampler]:
    """The samplers that run on ``pipe`` (with their Automatic schedule)."""
    return [s for s in SAMPLERS if _why_not(pipe, s, _auto(s)) is None]


def _auto(sampler: Sampler) -> Schedule | None:
    return _SCHEDULE_KEYS[sampler.default_schedule] if sampler.default_schedule else None


def choose(pipe: Any, sampler: str | None, scheduler: str | None = None, *, base: Any = None) -> Choice | None:
    """The scheduler A1111's ``sampler`` and ``scheduler`` names ask for on ``pipe`` (None for both: None, the
    pipeline's own). ``base`` is the model's scheduler (default: ``pipe.scheduler``). A name this model cannot
    run is a ConfigError that lists the samplers it can."""
    found, schedule = parse_names(sampler, scheduler)
    if found is None and schedule is None:
        return None
    base = pipe.scheduler if base is None else base
    if found is None:  # a schedule type for the model's own sampler
        found = _sampler_of(base)
        if found is None:
            raise ConfigError(f"scheduler {scheduler!r}: the model's scheduler {type(base).__name__} is no A1111 "
                              "sampler; give a sampler too")
    schedule = _auto(found) if schedule is None else schedule
    why = _why_not(pipe, found, schedule)
    if why is not None and schedule is not _auto(found) and _why_not(pipe, found, _auto(found)) is None:
        usable = [s.label for s in SCHEDULES if s.name == "automatic" or _why_not(pipe, found, s) is None]
        raise ConfigError(f"sampler {found.name!r} {why}; its schedule types for {type(pipe).__name__}: "
                          f"{', '.join(usable)}")
    if why is not None:
        names = ", ".join(s.name for s in available_samplers(pipe))
        raise ConfigError(f"sampler {found.name!r} {why}; samplers for {type(pipe).__name__}: {names}")
    if _flow(pipe):
        return Choice(found, None, _FLOW[found.name], _frozen(), own_solver=True)
    config: dict[str, Any] = {k: False for k in _SIGMA_FLAGS if k in _init_keys(found.scheduler)}
    config.update(found.config)
    if schedule is not None and schedule.name != "uniform":
        config.update(schedule.config or {})
    return Choice(found, None if schedule is None or schedule.name == "uniform" else schedule, found.scheduler,
                  _frozen(**config))


def _sampler_of(scheduler: Any) -> Sampler | None:
    """The A1111 sampler a diffusers scheduler is (its class and defining config keys), None if none is."""
    name = type(scheduler).__name__
    if name in _FLOW.values():
        return _BY_NAME[next(k for k, v in _FLOW.items() if v == name)]
    config = dict(scheduler.config)
    for sampler in SAMPLERS:
        if sampler.scheduler == name and all(config.get(k) == v for k, v in sampler.config.items()):
            return sampler
    return None


def current_choice(scheduler: Any) -> tuple[str, str | None]:
    """(A1111 sampler name, ``Schedule type`` or None) of a diffusers scheduler; a scheduler no A1111 sampler
    matches is named by its class."""
    sampler = _sampler_of(scheduler)
    if sampler is None:
        return type(scheduler).__name__, None
    config = dict(scheduler.config)
    for schedule in SCHEDULES:
        flags = {k: v for k, v in (schedule.config or {}).items() if k.startswith("use_")}
        if flags and all(config.get(k) == v for k, v in flags.items()):
            return sampler.name, schedule.label
    return sampler.name, "Uniform" if sampler.default_schedule and type(scheduler).__name__ not in _FLOW.values() \
        else None


def infotext_fields(pipe: Any, sampler: str | None, scheduler: str | None) -> tuple[str, str | None]:
    """(``Sampler``, ``Schedule type``) for the PNG infotext of a generation with these names."""
    choice = choose(pipe, sampler, scheduler)
    if choice is None:
        return current_choice(pipe.scheduler)
    return choice.sampler.name, choice.schedule_text


@contextlib.contextmanager
def swapped_scheduler(pipe: Any, scheduler: Any) -> Iterator[None]:
    """``pipe`` runs with ``scheduler`` inside (None: its own); its own scheduler is back afterwards, also on error."""
    if scheduler is None:
        yield
        return
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = own


def api_samplers(pipe: Any) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/samplers`` entries ({name, aliases, options}) for the samplers ``pipe`` runs."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in available_samplers(pipe)]


def api_schedulers(pipe: Any) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/schedulers`` entries for the schedule types some sampler of ``pipe`` runs with."""
    samplers = available_samplers(pipe)
    out = []
    for schedule in SCHEDULES:
        usable = schedule.name == "automatic" or any(_why_not(pipe, s, schedule) is None for s in samplers)
        if usable:
            out.append({"name": schedule.name, "label": schedule.label,
                        "aliases": list(schedule.aliases) if schedule.aliases else None,
                        "default_rho": schedule.default_rho, "need_inner_model": schedule.need_inner_model})
    return out
