"""Training objectives: diffusers as the oracle where it has the same function, hand-computed values elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_snr,
)

import diffusion_lora as dl
from diffusion_lora.training import objectives as obj
from diffusion_lora.training.config import Loss, TimestepSampling, load_config

SD_CONFIG = {  # the DDPM part of SD1.5/SDXL's scheduler_config.json
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


LOGIT_NORMAL, SHIFT = TimestepSampling.LOGIT_NORMAL, TimestepSampling.SHIFT


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize(
    "overrides",
    [{}, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, {"beta_schedule": "squaredcos_cap_v2"}],
)
def test_schedule_matches_ddpm_scheduler(overrides):
    config = {**SD_CONFIG, **overrides}
    ours = obj.ddpm_schedule(config)
    theirs = DDPMScheduler(**config).alphas_cumprod
    assert ours.alphas_cumprod.dtype == torch.float32 and ours.num_train_timesteps == 1000
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=2e-5, atol=1e-7)


def test_schedule_reads_prediction_type_and_defaults():
    assert (obj.ddpm_schedule({**SD_CONFIG, "prediction_type": "v_prediction"}).prediction_type
            is dl.Objective.V_PREDICTION)
    torch.testing.assert_close(
        obj.ddpm_schedule({}).alphas_cumprod, DDPMScheduler().alphas_cumprod, rtol=2e-5, atol=1e-7
    )


def test_add_noise_and_velocity_bit_equal_diffusers():
    scheduler = DDPMScheduler(**SD_CONFIG)
    schedule = obj.DiffusionSchedule(scheduler.alphas_cumprod.clone(), dl.Objective.EPSILON)
    g = gen(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    assert torch.equal(obj.add_noise(x0, noise, t, schedule), scheduler.add_noise(x0, noise, t))
    v = obj.ddpm_target(x0, noise, t, schedule, dl.Objective.V_PREDICTION)
    assert torch.equal(v, scheduler.get_velocity(x0, noise, t))
    assert obj.ddpm_target(x0, noise, t, schedule, dl.Objective.EPSILON) is noise
    # And from our own float64-built schedule, equal to float32 rounding.
    ours = obj.ddpm_schedule(SD_CONFIG)
    torch.testing.assert_close(obj.add_noise(x0, noise, t, ours), scheduler.add_noise(x0, noise, t))


def test_zero_terminal_snr_matches_diffusers_and_ends_at_zero():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(
        obj.rescale_zero_terminal_snr(betas), diffusers_rescale(betas.clone()), rtol=0, atol=1e-15
    )
    schedule = obj.ddpm_schedule(SD_CONFIG, zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1].item() == 0.0
    theirs = DDPMScheduler(**SD_CONFIG, rescale_betas_zero_snr=True).alphas_cumprod
    torch.testing.assert_close(schedule.alphas_cumprod, theirs, rtol=1e-4, atol=1e-7)
    # The scheduler config's own flag is honoured too; the first ᾱ is unchanged by the rescale.
    from_config = obj.ddpm_schedule({**SD_CONFIG, "rescale_betas_zero_snr": True})
    assert torch.equal(from_config.alphas_cumprod, schedule.alphas_cumprod)
    plain = obj.ddpm_schedule(SD_CONFIG).alphas_cumprod
    assert plain[-1] > 1e-3 and math.isclose(plain[0].item(), schedule.alphas_cumprod[0].item(), rel_tol=1e-6)


def test_snr_matches_compute_snr():
    scheduler = DDPMScheduler(**SD_CONFIG)
    schedule = obj.DiffusionSchedule(scheduler.alphas_cumprod.clone())
    t = torch.tensor([0, 1, 250, 999])
    torch.testing.assert_close(obj.snr(t, schedule), compute_snr(scheduler, t), rtol=1e-5, atol=0)


def test_min_snr_weights_formula():
    # ᾱ = 0.9, 0.5, 0.1, 0 → snr = 9, 1, 1/9, 0.
    schedule = obj.DiffusionSchedule(torch.tensor([0.9, 0.5, 0.1, 0.0]))
    t = torch.arange(4)
    torch.testing.assert_close(obj.snr(t, schedule), torch.tensor([9.0, 1.0, 1 / 9, 0.0]))
    eps = obj.min_snr_weights(t, schedule, 5.0, dl.Objective.EPSILON)
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0, 1.0]))  # 1 at snr = 0: the limit, no NaN
    v = obj.min_snr_weights(t, schedule, 5.0, dl.Objective.V_PREDICTION)
    torch.testing.assert_close(v, torch.tensor([5 / 10, 1 / 2, 0.1, 0.0]))


def test_sample_timesteps_ddpm_deterministic_and_in_range():
    a = obj.sample_timesteps_ddpm(4096, 1000, gen(3))
    assert a.dtype == torch.long and a.shape == (4096,)
    assert int(a.min()) >= 0 and int(a.max()) <= 999 and int(a.max()) > 990
    assert torch.equal(a, obj.sample_timesteps_ddpm(4096, 1000, gen(3)))
    assert not torch.equal(a, obj.sample_timesteps_ddpm(4096, 1000, gen(4)))


def test_noise_with_offset():
    shape = (2, 3, 8, 8)
    g = gen(5)
    base, extra = torch.randn(shape, generator=g), torch.randn(2, 3, 1, 1, generator=g)
    noise = obj.noise_with_offset(shape, gen(5), 0.1)
    assert torch.equal(noise, base + 0.1 * extra)
    assert torch.equal(obj.noise_with_offset(shape, gen(5), 0.0), base)  # no second draw
    # The offset is constant over each [b, c] plane.
    delta = noise - base
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- flow matching


def test_logit_normal_matches_diffusers_density_sampling():
    ours = obj.sample_sigmas(64, gen(7), sampling=LOGIT_NORMAL, logit_mean=0.3, logit_std=1.2)
    theirs = compute_density_for_timestep_sampling("logit_normal", 64, 0.3, 1.2, generator=gen(7))
    assert torch.equal(ours, theirs)
    sigmoid = obj.sample_sigmas(64, gen(7), sampling=TimestepSampling.SIGMOID, logit_mean=0.3, logit_std=1.2)
    assert torch.equal(sigmoid, ours)


def test_objectives_take_the_config_settings_as_loaded():
    cfg = load_config({"data": {"path": "d"}, "output": {"dir": "o"},
                       "train": {"timestep_sampling": "sigmoid", "loss": "huber", "huber_delta": 0.5}}).train
    ln = obj.sample_sigmas(8, gen(2), sampling=LOGIT_NORMAL)
    assert torch.equal(obj.sample_sigmas(8, gen(2), sampling=cfg.timestep_sampling), ln)
    pred, target = torch.full((1, 1), 1.5), torch.zeros(1, 1)
    expected = 2 * 0.5 * (math.sqrt(1.5**2 + 0.5**2) - 0.5)
    loss = obj.lora_loss(pred, target, kind=cfg.loss, huber_delta=cfg.huber_delta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sampler_statistics():
    n = 20000
    ln = obj.sample_sigmas(n, gen(8), sampling=LOGIT_NORMAL, logit_mean=0.5)
    assert abs(ln.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01
    uni = obj.sample_sigmas(n, gen(8), sampling=TimestepSampling.UNIFORM)
    assert abs(uni.mean().item() - 0.5) < 0.01 and abs(uni.median().item() - 0.5) < 0.01
    shifted = obj.sample_sigmas(n, gen(8), sampling=SHIFT, shift=3.0)
    assert torch.equal(shifted, obj.shift_sigmas(uni, 3.0))  # same uniform draw, then shifted
    assert bool((shifted >= uni).all()) and shifted.mean() > uni.mean() + 0.1
    assert obj.sample_sigmas(n, gen(8), sampling=SHIFT, shift=0.5).mean() < uni.mean() - 0.05
    for sigma in (ln, uni, shifted):
        assert bool(((sigma > 0) & (sigma < 1)).all())


def test_sigma_sampling_deterministic_and_composes():
    for sampling in TimestepSampling:
        a = obj.sample_sigmas(16, gen(9), sampling=sampling, shift=2.0 if sampling is SHIFT else None)
        b = obj.sample_sigmas(16, gen(9), sampling=sampling, shift=2.0 if sampling is SHIFT else None)
        assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (16,)
    ln = obj.sample_sigmas(16, gen(9), sampling=LOGIT_NORMAL)
    sd3 = obj.sample_sigmas(16, gen(9), sampling=LOGIT_NORMAL, shift=3.0)
    assert torch.equal(sd3, obj.shift_sigmas(ln, 3.0))
    mu = obj.flux_shift(4096)
    flux = obj.sample_flux_sigmas(16, gen(9), mu=mu)
    torch.testing.assert_close(flux, obj.time_shift_exponential(mu, ln))


def test_flux_shift_matches_calculate_shift():
    for seq_len in (256, 1024, 4096, 6144):
        assert obj.flux_shift(seq_len) == calculate_shift(seq_len)
    assert obj.flux_shift(4096) == pytest.approx(1.15) and obj.flux_shift(256) == pytest.approx(0.5)


def test_time_shifts_match_flow_match_scheduler():
    base = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    static = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    torch.testing.assert_close(obj.shift_sigmas(base, 3.0), static, rtol=0, atol=1e-7)
    # The static shift is the exponential one with mu = ln(shift).
    torch.testing.assert_close(obj.time_shift_exponential(math.log(3.0), base), static, rtol=1e-6, atol=1e-7)

    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas = [1.0, 0.8, 0.5, 0.2, 0.05]
    mu = calculate_shift(1024)
    dynamic.set_timesteps(sigmas=sigmas, mu=mu)
    ours = obj.time_shift_exponential(mu, torch.tensor(sigmas))
    torch.testing.assert_close(ours, dynamic.sigmas[:-1], rtol=1e-6, atol=1e-7)
    assert dynamic.sigmas[-1] == 0


def test_flow_noisy_target_and_timesteps():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = gen(10)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    timesteps = scheduler.timesteps[[10, 500, 990]]
    sigma = timesteps / 1000
    torch.testing.assert_close(obj.flow_noisy(x0, noise, sigma), scheduler.scale_noise(x0, timesteps, noise))
    torch.testing.assert_close(obj.sigmas_to_timesteps(sigma), timesteps)
    assert torch.equal(obj.flow_target(x0, noise), noise - x0)
    # Endpoints: σ = 0 gives the clean latent, σ = 1 pure noise.
    ends = obj.flow_noisy(x0[:2], noise[:2], torch.tensor([0.0, 1.0]))
    assert torch.equal(ends[0], x0[0]) and torch.equal(ends[1], noise[1])


# ---------------------------------------------------------------------------------------------- loss


def test_l2_loss_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    # Per-sample means: (1 + 4)/2 = 2.5 and (9 + 1)/2 = 5.
    assert obj.lora_loss(pred, target).item() == pytest.approx(3.75)
    weighted = obj.lora_loss(pred, target, weights=torch.tensor([2.0, 0.5]))
    assert weighted.item() == pytest.approx((2 * 2.5 + 0.5 * 5) / 2)
    half = obj.lora_loss(pred.bfloat16(), target.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(3.75)


def test_huber_loss_hand_computed_and_limits():
    delta = 0.5
    pred, target = torch.tensor([[1.5]]), torch.tensor([[0.0]])
    expected = 2 * delta * (math.sqrt(1.5**2 + delta**2) - delta)
    assert obj.lora_loss(pred, target, kind=Loss.HUBER, huber_delta=delta).item() == pytest.approx(expected, rel=1e-6)
    small = torch.full((1, 4), 1e-3)
    l2 = obj.lora_loss(small, torch.zeros_like(small))
    huber = obj.lora_loss(small, torch.zeros_like(small), kind=Loss.HUBER, huber_delta=0.1)
    assert huber.item() == pytest.approx(l2.item(), rel=1e-4)  # quadratic, equal to l2, for |r| ≪ δ
    tiny = obj.lora_loss(torch.full((1, 1), 1e-6), torch.zeros(1, 1), kind=Loss.HUBER, huber_delta=0.1)
    assert tiny.item() == pytest.approx(1e-12, rel=1e-4)  # no cancellation to 0 in float32
    big = [
        obj.lora_loss(torch.full((1, 1), r), torch.zeros(1, 1), kind=Loss.HUBER, huber_delta=0.1).item()
        for r in (100, 200)
    ]
    assert (big[1] - big[0]) / 100 == pytest.approx(2 * 0.1, rel=1e-4)  # linear, slope 2δ, for |r| ≫ δ
    assert big[0] == pytest.approx(2 * 0.1 * 100 - 2 * 0.1**2, rel=1e-5)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({"beta_schedule": "sigmoidal"}, "scheduler.beta_schedule"),
        ({"prediction_type": "sample"}, "scheduler.prediction_type"),
        ({"prediction_type": "flow_matching"}, "scheduler.prediction_type"),
        ({"num_train_timesteps": 0}, "scheduler.num_train_timesteps"),
        ({"beta_start": 0.0}, "scheduler.beta_start"),
        ({"trained_betas": [0.1, 0.2]}, "scheduler.trained_betas"),
    ],
)
def test_a_bad_scheduler_config_raises_config_error_naming_its_key(config, setting):
    with pytest.raises(dl.ConfigError, match=f"^{setting.replace('.', '[.]')}: "):
        obj.ddpm_schedule(config)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"timestep_sampling": "gaussian"}, "train.timestep_sampling: expected one of"),
        ({"loss": "l3"}, "train.loss: expected one of 'l2', 'huber', got 'l3'"),
        ({"shift": -1.0}, "train.shift: -1.0 is out of range"),
        ({"logit_std": 0.0}, "train.logit_std: 0.0 is out of range"),
        ({"huber_delta": 0}, "train.huber_delta: 0.0 is out of range"),
        ({"min_snr_gamma": 0}, "train.min_snr_gamma: 0.0 is out of range"),
        ({"noise_offset": -0.1}, "train.noise_offset: -0.1 is out of range"),
    ],
)
def test_the_config_refuses_bad_objective_settings_naming_the_real_key(train, message):
    """The objectives trust the checked config; the config is where a bad setting is named."""
    with pytest.raises(dl.ConfigError) as info:
        load_config({"data": {"path": "d"}, "output": {"dir": "o"}, "train": train})
    assert str(info.value).startswith(message), str(info.value)


def test_shift_sampling_without_a_shift_value_is_a_programming_error():
    with pytest.raises(ValueError, match="SHIFT sampling needs a shift"):
        obj.sample_sigmas(2, gen(), sampling=SHIFT)
