"""Training objectives as pure functions on tensors.

Two families of objectives live here:

* **DDPM** (SD1, SD2, SDXL): integer timesteps ``t`` in ``[0, T)`` index a :class:`DiffusionSchedule`;
  ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` and the denoiser predicts ε (``epsilon``) or
  ``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0`` (``v_prediction``), exactly as diffusers' ``DDPMScheduler``.
* **Flow matching** (SD3, Flux.1): a continuous ``σ`` in (0, 1); ``x_σ = (1-σ)·x0 + σ·ε`` and the
  denoiser predicts the velocity ``ε - x0``, as in diffusers' SD3/Flux LoRA training examples.

Every random draw takes an explicit ``torch.Generator`` and is made on that generator's device, so a
seed reproduces a run. Nothing here holds state or touches a model; the training loop composes these.
Bad settings raise :class:`~diffusion_lora.errors.ConfigError` naming the ``train.*`` key at fault.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from diffusion_lora.errors import ConfigError
from diffusion_lora.families import Objective

__all__ = [
    "DiffusionSchedule",
    "FlowWeighting",
    "LossKind",
    "TimestepSampling",
    "add_noise",
    "ddpm_schedule",
    "ddpm_target",
    "flow_loss_weights",
    "flow_noisy",
    "flow_target",
    "flux_shift",
    "lora_loss",
    "min_snr_weights",
    "noise_with_offset",
    "rescale_zero_terminal_snr",
    "sample_sigmas",
    "sample_timesteps_ddpm",
    "shift_sigmas",
    "sigmas_to_timesteps",
    "snr",
    "time_shift_exponential",
]


class TimestepSampling(str, enum.Enum):
    """How flow-matching σ are drawn (``train.timestep_sampling``); ``"sigmoid"`` is read as LOGIT_NORMAL."""

    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"
    SHIFT = "shift"
    FLUX_SHIFT = "flux_shift"


class LossKind(str, enum.Enum):
    """Element-wise loss (``train.loss_type``)."""

    L2 = "l2"
    HUBER = "huber"


class FlowWeighting(str, enum.Enum):
    """Per-sample flow-matching loss weights (``train.loss_weighting``), as diffusers' SD3 scripts."""

    NONE = "none"
    SIGMA_SQRT = "sigma_sqrt"
    COSMAP = "cosmap"


# σ is kept inside the open interval (0, 1): float32 draws can otherwise hit 0 (rand) or 1 (sigmoid).
_SIGMA_EPS = 2.0**-24


def _enum(cls: type[enum.Enum], value: object, setting: str, aliases: Mapping[str, str] | None = None) -> enum.Enum:
    if isinstance(value, cls):
        return value
    if isinstance(value, enum.Enum):  # another module's enum (e.g. the config's): look up by its value
        value = value.value
    aliases = aliases or {}
    name = aliases.get(value, value) if isinstance(value, str) else value
    try:
        return cls(name)
    except ValueError:
        choices = ", ".join([m.value for m in cls] + list(aliases))
        raise ConfigError(f"{setting}: unknown value {value!r}; expected one of {choices}") from None


def _positive(value: object, setting: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ConfigError(f"{setting}: got {value!r}; expected {bound}")
    return float(value)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to [B, 1, ...] so it broadcasts against ``like`` [B, ...]."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _ddpm_objective(objective: Objective | str, setting: str = "train.objective") -> Objective:
    obj = _enum(Objective, objective, setting)
    if obj is Objective.FLOW_MATCHING:
        raise ConfigError(f"{setting}: flow_matching is not a DDPM objective; expected epsilon or v_prediction")
    return obj


# ---------------------------------------------------------------------------------------------- DDPM


@dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """A DDPM noise schedule: ``alphas_cumprod`` [T] float32 (ᾱ_t) and the model's prediction type."""

    alphas_cumprod: torch.Tensor
    prediction_type: Objective = Objective.EPSILON

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod
        if ac.ndim != 1 or ac.numel() == 0 or not ac.is_floating_point():
            raise ConfigError(
                f"alphas_cumprod: expected a non-empty 1-D float tensor, got {tuple(ac.shape)} {ac.dtype}"
            )
        if bool(((ac < 0) | (ac > 1)).any()):
            raise ConfigError("alphas_cumprod: values must lie in [0, 1]")
        object.__setattr__(self, "prediction_type", _ddpm_objective(self.prediction_type, "scheduler.prediction_type"))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


# DDPMScheduler's defaults, used for keys absent from a scheduler config (as diffusers itself does).
_DDPM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` [T] so that ᾱ_{T-1} = 0 (Lin et al. 2023, Algorithm 1), in float64.

    Shifts sqrt(ᾱ) so its last value is 0 and rescales it so its first value is unchanged; the same
    math as diffusers' ``rescale_zero_terminal_snr``. The last beta becomes exactly 1.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def ddpm_schedule(scheduler_config: Mapping, *, zero_terminal_snr: bool = False) -> DiffusionSchedule:
    """Build a :class:`DiffusionSchedule` from a diffusers DDPM-style scheduler config.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (linear,
    scaled_linear, squaredcos_cap_v2), ``prediction_type`` (epsilon, v_prediction) and
    ``rescale_betas_zero_snr``; absent keys take ``DDPMScheduler``'s defaults, other keys are not
    used. Betas and ᾱ are computed in float64 and stored as float32. Zero terminal SNR is applied
    when ``zero_terminal_snr`` or the config's ``rescale_betas_zero_snr`` is true.
    """
    cfg = {key: scheduler_config.get(key, default) for key, default in _DDPM_DEFAULTS.items()}
    if scheduler_config.get("trained_betas") is not None:
        raise ConfigError("scheduler.trained_betas: explicit betas are not supported; use a beta_schedule")
    steps = cfg["num_train_timesteps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ConfigError(f"scheduler.num_train_timesteps: got {steps!r}; expected an integer >= 2")
    start, end = (_positive(cfg[k], f"scheduler.{k}") for k in ("beta_start", "beta_end"))
    if not (start < 1 and end < 1):
        raise ConfigError(f"scheduler.beta_start/beta_end: got {start}, {end}; expected values in (0, 1)")

    kind = cfg["beta_schedule"]
    if kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(steps)
    else:
        raise ConfigError(
            f"scheduler.beta_schedule: unknown value {kind!r}; expected linear, scaled_linear or squaredcos_cap_v2"
        )
    if zero_terminal_snr or cfg["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    return DiffusionSchedule(alphas_cumprod, _ddpm_objective(cfg["prediction_type"], "scheduler.prediction_type"))


def sample_timesteps_ddpm(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``batch`` timesteps uniformly from ``[0, num_train_timesteps)``: LongTensor [batch]."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)


def _sqrt_alphas(t: torch.Tensor, schedule: DiffusionSchedule, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The same operations, in the same dtype, as DDPMScheduler.add_noise/get_velocity: results are bit-equal.
    ac = schedule.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    return _per_sample((ac**0.5).flatten(), like), _per_sample(((1 - ac) ** 0.5).flatten(), like)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise``; x0, noise [B, ...], t [B] integer; in x0's dtype."""
    sqrt_a, sqrt_1ma = _sqrt_alphas(t, schedule, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def ddpm_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule, objective: Objective | str
) -> torch.Tensor:
    """What the denoiser should predict: ``noise`` itself (epsilon) or ``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0``."""
    if _ddpm_objective(objective) is Objective.EPSILON:
        return noise
    sqrt_a, sqrt_1ma = _sqrt_alphas(t, schedule, x0)
    return sqrt_a * noise - sqrt_1ma * x0


def snr(t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Signal-to-noise ratio ``ᾱ_t / (1-ᾱ_t)`` [B] float32 (0 where ᾱ_t = 0), computed in float64."""
    ac = schedule.alphas_cumprod.to(t.device, torch.float64)[t]
    return (ac / (1.0 - ac)).to(torch.float32)


def min_snr_weights(
    t: torch.Tensor, schedule: DiffusionSchedule, gamma: float, objective: Objective | str
) -> torch.Tensor:
    """Min-SNR-γ per-sample loss weights [B] (Hang et al. 2023), the diffusers training-script convention.

    epsilon: ``min(snr, γ) / snr`` (1 where snr = 0, its limit, e.g. at a zero-terminal-SNR step);
    v_prediction: ``min(snr, γ) / (snr + 1)``.
    """
    gamma = _positive(gamma, "train.min_snr_gamma")
    objective = _ddpm_objective(objective)
    s = snr(t, schedule)
    clipped = torch.clamp(s, max=gamma)
    if objective is Objective.EPSILON:
        return torch.where(s > 0, clipped / s, torch.ones_like(s))
    return clipped / (s + 1)


def noise_with_offset(
    shape: Sequence[int], generator: torch.Generator, offset: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian noise of ``shape`` [B, C, ...] plus ``offset·N(0, 1)`` of shape [B, C, 1, ...] (kohya's offset noise).

    Drawn in float32 on the generator's device, then cast to ``dtype``, so a seed gives the same noise
    in every dtype. With ``offset == 0`` the second draw is skipped: the result is plain ``randn(shape)``.
    """
    offset = _positive(offset, "train.noise_offset", allow_zero=True)
    shape = tuple(shape)
    if len(shape) < 2:
        raise ConfigError(f"noise shape: got {shape}; expected at least [batch, channels]")
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    if offset:
        per_channel = shape[:2] + (1,) * (len(shape) - 2)
        noise = noise + offset * torch.randn(per_channel, generator=generator, device=generator.device)
    return noise.to(dtype)


# ------------------------------------------------------------------------------------- flow matching


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static time shift ``shift·σ / (1 + (shift-1)·σ)`` (SD3; FlowMatchEulerDiscreteScheduler's ``shift``).

    Equals :func:`time_shift_exponential` with ``mu = ln(shift)``. ``shift > 1`` moves σ toward 1 (noisier).
    """
    shift = _positive(shift, "train.flow_shift")
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent ``mu``: linear in ``image_seq_len`` through (base_seq_len, base_shift)
    and (max_seq_len, max_shift), as diffusers' ``calculate_shift``.

    For Flux, ``image_seq_len = (height // 16) * (width // 16)`` in pixels, i.e. the number of 2×2
    latent patches (1024×1024 → 4096).
    """
    if max_seq_len == base_seq_len:
        raise ConfigError("train.flux_shift: max_seq_len must differ from base_seq_len")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift_exponential(mu: float, sigma: torch.Tensor, *, exponent: float = 1.0) -> torch.Tensor:
    """Flux's shift ``e^mu / (e^mu + (1/σ - 1)^exponent)``; Flux uses ``exponent = 1`` and ``mu`` from
    :func:`flux_shift`. Same as FlowMatchEulerDiscreteScheduler's exponential ``time_shift(mu, exponent, σ)``.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1) ** exponent)


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    *,
    sampling: TimestepSampling | str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """Draw flow-matching noise levels σ [batch] float32 in the open interval (0, 1).

    * ``uniform``: U(0, 1).
    * ``logit_normal`` (alias ``sigmoid``): ``sigmoid(N(logit_mean, logit_std))`` — the same draw as
      diffusers' ``compute_density_for_timestep_sampling("logit_normal", ...)`` for one generator state.
    * ``shift``: U(0, 1), then :func:`shift_sigmas` with ``shift`` (required).
    * ``flux_shift``: logit-normal, then :func:`time_shift_exponential` with ``mu`` (required; from
      :func:`flux_shift`), as kohya's Flux trainer.

    ``shift`` given with ``uniform`` or ``logit_normal`` is applied after the draw (SD3's scheduler
    shift of 3.0 over logit-normal draws, as diffusers' SD3 script, is ``logit_normal`` + ``shift=3``).
    σ is continuous; it is not snapped to the scheduler's 1000 training levels.
    """
    kind = _enum(TimestepSampling, sampling, "train.timestep_sampling", {"sigmoid": "logit_normal"})
    logit_std = _positive(logit_std, "train.logit_std")
    if not (isinstance(logit_mean, (int, float)) and math.isfinite(logit_mean)):
        raise ConfigError(f"train.logit_mean: got {logit_mean!r}; expected a finite number")
    if shift is not None:
        shift = _positive(shift, "train.flow_shift")
    if kind is TimestepSampling.SHIFT and shift is None:
        raise ConfigError("train.flow_shift: timestep_sampling 'shift' needs a shift value (> 0)")
    if kind is TimestepSampling.FLUX_SHIFT and (mu is None or shift is not None):
        raise ConfigError("train.timestep_sampling: 'flux_shift' needs mu (from flux_shift()) and no flow_shift")
    if kind is not TimestepSampling.FLUX_SHIFT and mu is not None:
        raise ConfigError(f"train.timestep_sampling: mu is only used by 'flux_shift', not {kind.value!r}")

    device = generator.device
    if kind in (TimestepSampling.LOGIT_NORMAL, TimestepSampling.FLUX_SHIFT):
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=device, generator=generator)
        sigma = torch.sigmoid(u)
    else:
        sigma = torch.rand((batch,), device=device, generator=generator)
    if kind is TimestepSampling.FLUX_SHIFT:
        sigma = time_shift_exponential(mu, sigma)
    elif shift is not None:
        sigma = shift_sigmas(sigma, shift)
    return sigma.clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1-σ)·x0 + σ·noise``; x0, noise [B, ...], sigma [B]; in x0's dtype."""
    s = _per_sample(sigma.to(device=x0.device, dtype=x0.dtype), x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity target ``noise - x0`` (what SD3 and Flux transformers predict)."""
    return noise - x0


def sigmas_to_timesteps(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``σ·num_train_timesteps``: the ``timestep`` SD3's transformer takes, in [0, 1000].

    Flux's transformer instead takes ``timestep / 1000`` — i.e. σ itself — and multiplies by 1000
    internally (diffusers' FluxPipeline passes ``timestep / 1000``); pass σ directly to Flux.
    """
    return sigma * num_train_timesteps


def flow_loss_weights(sigma: torch.Tensor, weighting: FlowWeighting | str = FlowWeighting.NONE) -> torch.Tensor:
    """Per-sample weights [B] for flow matching, as diffusers' ``compute_loss_weighting_for_sd3``:
    ``none`` → 1, ``sigma_sqrt`` → σ⁻², ``cosmap`` → 2 / (π·(1 - 2σ + 2σ²)).
    """
    kind = _enum(FlowWeighting, weighting, "train.loss_weighting")
    if kind is FlowWeighting.SIGMA_SQRT:
        return (sigma**-2.0).float()
    if kind is FlowWeighting.COSMAP:
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


# ---------------------------------------------------------------------------------------------- loss


def lora_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: LossKind | str = LossKind.L2,
    huber_delta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss: element-wise loss, mean over non-batch dims, times ``weights`` [B] if given, batch mean.

    Computed in at least float32. ``l2``: r² with r = pred - target. ``huber`` (kohya's pseudo-Huber):
    ``2δ·(sqrt(r² + δ²) - δ)``, evaluated as ``2δ·r² / (sqrt(r² + δ²) + δ)`` to avoid cancellation; it
    tends to r² (the l2 loss) for |r| ≪ δ and to ``2δ·|r| - 2δ²`` (linear) for |r| ≫ δ. The weighted
    mean is ``mean_b(w_b · loss_b)`` (not normalized by the sum of weights), as diffusers' Min-SNR code.
    """
    kind = _enum(LossKind, kind, "train.loss_type")
    delta = _positive(huber_delta, "train.huber_delta")
    if pred.shape != target.shape or pred.ndim == 0:
        raise ValueError(f"lora_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must match, [B, ...]")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    r2 = (pred.to(dtype) - target.to(dtype)) ** 2
    elementwise = r2 if kind is LossKind.L2 else 2 * delta * r2 / (torch.sqrt(r2 + delta**2) + delta)
    per_sample = elementwise.reshape(pred.shape[0], -1).mean(dim=1)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"lora_loss: weights {tuple(weights.shape)} must be [batch] = {tuple(per_sample.shape)}")
        per_sample = per_sample * weights.to(device=per_sample.device, dtype=dtype)
    return per_sample.mean()
