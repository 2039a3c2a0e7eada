"""Training objectives as pure functions on tensors.

Two families of objectives live here:

* **DDPM** (SD1, SD2, SDXL): integer timesteps ``t`` in ``[0, T)`` index a :class:`DiffusionSchedule`;
  ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` and the denoiser predicts ε (``epsilon``) or
  ``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0`` (``v_prediction``), exactly as diffusers' ``DDPMScheduler``.
* **Flow matching** (SD3, Flux.1): a continuous ``σ`` in (0, 1); ``x_σ = (1-σ)·x0 + σ·ε`` and the
  denoiser predicts the velocity ``ε - x0``, as in diffusers' SD3/Flux LoRA training examples.

Every random draw takes an explicit ``torch.Generator`` and is made on that generator's device, so a
seed reproduces a run. Nothing here holds state or touches a model; the training loop composes these.
Settings come from the checked :class:`~.config.TrainConfig` (its enums, its ranges) and are not
checked again here; a model's scheduler config, read by :func:`ddpm_schedule`, is checked, and its
problems are :class:`~diffusion_lora.errors.ConfigError`\ s naming the ``scheduler.*`` key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from diffusion_lora.errors import ConfigError
from diffusion_lora.families import Objective

from .config import Loss, TimestepSampling

__all__ = [
    "DiffusionSchedule",
    "add_noise",
    "ddpm_schedule",
    "ddpm_target",
    "flow_noisy",
    "flow_target",
    "flux_shift",
    "lora_loss",
    "min_snr_weights",
    "noise_with_offset",
    "rescale_zero_terminal_snr",
    "sample_flux_sigmas",
    "sample_sigmas",
    "sample_timesteps_ddpm",
    "shift_sigmas",
    "sigmas_to_timesteps",
    "snr",
    "time_shift_exponential",
]


# σ is kept inside the open interval (0, 1): float32 draws can otherwise hit 0 (rand) or 1 (sigmoid).
_SIGMA_EPS = 2.0**-24


def _positive(value: object, key: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ConfigError(f"{key}: got {value!r}; expected a finite number > 0")
    return float(value)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to [B, 1, ...] so it broadcasts against ``like`` [B, ...]."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _prediction_type(value: object) -> Objective:
    """A scheduler config's ``prediction_type`` (a string, or already an :class:`Objective`) as a DDPM objective."""
    try:
        objective = Objective(value)
    except ValueError:
        choices = ", ".join(o.value for o in Objective)
        raise ConfigError(f"scheduler.prediction_type: unknown value {value!r}; expected one of {choices}") from None
    if objective is Objective.FLOW_MATCHING:
        raise ConfigError("scheduler.prediction_type: flow_matching is not a DDPM objective; expected epsilon or "
                          "v_prediction")
    return objective


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
        object.__setattr__(self, "prediction_type", _prediction_type(self.prediction_type))

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
    return DiffusionSchedule(alphas_cumprod, _prediction_type(cfg["prediction_type"]))


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
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule, objective: Objective
) -> torch.Tensor:
    """What the denoiser should predict: ``noise`` itself (epsilon) or ``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0``
    (v_prediction); ``objective`` is a DDPM one, as :attr:`DiffusionSchedule.prediction_type` is."""
    if objective is Objective.EPSILON:
        return noise
    sqrt_a, sqrt_1ma = _sqrt_alphas(t, schedule, x0)
    return sqrt_a * noise - sqrt_1ma * x0


def snr(t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Signal-to-noise ratio ``ᾱ_t / (1-ᾱ_t)`` [B] float32 (0 where ᾱ_t = 0), computed in float64."""
    ac = schedule.alphas_cumprod.to(t.device, torch.float64)[t]
    return (ac / (1.0 - ac)).to(torch.float32)


def min_snr_weights(t: torch.Tensor, schedule: DiffusionSchedule, gamma: float, objective: Objective) -> torch.Tensor:
    """Min-SNR-γ per-sample loss weights [B] (Hang et al. 2023), the diffusers training-script convention.

    epsilon: ``min(snr, γ) / snr`` (1 where snr = 0, its limit, e.g. at a zero-terminal-SNR step);
    v_prediction: ``min(snr, γ) / (snr + 1)``.
    """
    s = snr(t, schedule)
    clipped = torch.clamp(s, max=gamma)
    if objective is Objective.EPSILON:
        return torch.where(s > 0, clipped / s, torch.ones_like(s))
    return clipped / (s + 1)


def noise_with_offset(shape: Sequence[int], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise of ``shape`` [B, C, ...] plus ``offset·N(0, 1)`` of shape [B, C, 1, ...] (kohya's offset noise).

    Drawn in float32 on the generator's device, so a seed gives the same noise whatever the model's
    dtype. With ``offset == 0`` the second draw is skipped: the result is plain ``randn(shape)``.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ConfigError(f"noise shape: got {shape}; expected at least [batch, channels]")
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    if offset:
        per_channel = shape[:2] + (1,) * (len(shape) - 2)
        noise = noise + offset * torch.randn(per_channel, generator=generator, device=generator.device)
    return noise


# ------------------------------------------------------------------------------------- flow matching


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static time shift ``shift·σ / (1 + (shift-1)·σ)`` (SD3; FlowMatchEulerDiscreteScheduler's ``shift``).

    Equals :func:`time_shift_exponential` with ``mu = ln(shift)``. ``shift > 1`` moves σ toward 1 (noisier).
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


# Flux's shift line, as diffusers' calculate_shift defaults and Flux's scheduler config.
_FLUX_BASE_SEQ_LEN, _FLUX_MAX_SEQ_LEN, _FLUX_BASE_SHIFT, _FLUX_MAX_SHIFT = 256, 4096, 0.5, 1.15


def flux_shift(image_seq_len: int) -> float:
    """Flux's resolution-dependent ``mu``: linear in ``image_seq_len`` through (256, 0.5) and (4096, 1.15),
    as diffusers' ``calculate_shift`` with its defaults.

    For Flux, ``image_seq_len = (height // 16) * (width // 16)`` in pixels, i.e. the number of 2×2
    latent patches (1024×1024 → 4096).
    """
    m = (_FLUX_MAX_SHIFT - _FLUX_BASE_SHIFT) / (_FLUX_MAX_SEQ_LEN - _FLUX_BASE_SEQ_LEN)
    b = _FLUX_BASE_SHIFT - m * _FLUX_BASE_SEQ_LEN
    return image_seq_len * m + b


def time_shift_exponential(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """Flux's shift ``e^mu / (e^mu + (1/σ - 1))``, ``mu`` from :func:`flux_shift`. Same as
    FlowMatchEulerDiscreteScheduler's exponential ``time_shift(mu, 1.0, σ)``.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    *,
    sampling: TimestepSampling,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float | None = None,
) -> torch.Tensor:
    """Draw flow-matching noise levels σ [batch] float32 in the open interval (0, 1).

    * ``UNIFORM``: U(0, 1).
    * ``LOGIT_NORMAL`` (or ``SIGMOID``, its other name): ``sigmoid(N(logit_mean, logit_std))`` — the
      same draw as diffusers' ``compute_density_for_timestep_sampling("logit_normal", ...)`` for one
      generator state.
    * ``SHIFT``: U(0, 1), then :func:`shift_sigmas` with ``shift`` (required: ValueError without it).

    ``shift`` given with ``UNIFORM`` or ``LOGIT_NORMAL`` is applied after the draw (SD3's scheduler
    shift of 3.0 over logit-normal draws, as diffusers' SD3 script, is ``LOGIT_NORMAL`` + ``shift=3``).
    σ is continuous; it is not snapped to the scheduler's 1000 training levels.
    """
    if sampling is TimestepSampling.SHIFT and shift is None:
        raise ValueError("sample_sigmas: SHIFT sampling needs a shift value")
    if sampling in (TimestepSampling.LOGIT_NORMAL, TimestepSampling.SIGMOID):
        sigma = _logit_normal(batch, generator, logit_mean, logit_std)
    else:
        sigma = torch.rand((batch,), device=generator.device, generator=generator)
    if shift is not None:
        sigma = shift_sigmas(sigma, shift)
    return sigma.clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)


def sample_flux_sigmas(
    batch: int, generator: torch.Generator, *, mu: float, logit_mean: float = 0.0, logit_std: float = 1.0
) -> torch.Tensor:
    """Flux's resolution-dependent draw, as kohya's Flux trainer: logit-normal σ, then
    :func:`time_shift_exponential` with ``mu`` (from :func:`flux_shift`); [batch] float32 in (0, 1)."""
    sigma = time_shift_exponential(mu, _logit_normal(batch, generator, logit_mean, logit_std))
    return sigma.clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)


def _logit_normal(batch: int, generator: torch.Generator, mean: float, std: float) -> torch.Tensor:
    u = torch.normal(mean=mean, std=std, size=(batch,), device=generator.device, generator=generator)
    return torch.sigmoid(u)


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


# ---------------------------------------------------------------------------------------------- loss


def lora_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: Loss = Loss.L2,
    huber_delta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss: element-wise loss, mean over non-batch dims, times ``weights`` [B] if given, batch mean.

    Computed in at least float32. ``l2``: r² with r = pred - target. ``huber`` (kohya's pseudo-Huber):
    ``2δ·(sqrt(r² + δ²) - δ)``, evaluated as ``2δ·r² / (sqrt(r² + δ²) + δ)`` to avoid cancellation; it
    tends to r² (the l2 loss) for |r| ≪ δ and to ``2δ·|r| - 2δ²`` (linear) for |r| ≫ δ. The weighted
    mean is ``mean_b(w_b · loss_b)`` (not normalized by the sum of weights), as diffusers' Min-SNR code.
    """
    if pred.shape != target.shape or pred.ndim == 0:
        raise ValueError(f"lora_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must match, [B, ...]")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    r2 = (pred.to(dtype) - target.to(dtype)) ** 2
    delta = huber_delta
    elementwise = r2 if kind is Loss.L2 else 2 * delta * r2 / (torch.sqrt(r2 + delta**2) + delta)
    per_sample = elementwise.reshape(pred.shape[0], -1).mean(dim=1)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"lora_loss: weights {tuple(weights.shape)} must be [batch] = {tuple(per_sample.shape)}")
        per_sample = per_sample * weights.to(device=per_sample.device, dtype=dtype)
    return per_sample.mean()
