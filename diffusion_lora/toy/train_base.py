"""Train the embedded base model from scratch on procedural pictures, on CPU, reproducibly.

Stages, each a pure function of the plan and its seed:

1. the VAE learns to reconstruct scenes of every style (and the mascot), as a real SD VAE can
   reconstruct pictures its UNet never draws: from the posterior mean, with shape pixels weighted
   up (exact colours), first at a one-cycle learning rate, then again at a lower, decaying one; its
   latent ``scaling_factor`` is then measured, as Stable Diffusion's 0.18215 was;
2. a fixed set of plain scenes from :func:`~diffusion_lora.toy.scenes.training_combos` is encoded once;
3. the UNet and the CLIP text encoder learn together the v-prediction objective on a zero-terminal-SNR
   schedule (see :func:`~diffusion_lora.toy.base_model.scheduler_config`) on those latents, with 10 %
   of captions dropped (so classifier-free guidance works), min-SNR-5 loss weights (on ``snr + 1``, so
   the pure-noise step keeps its weight) and an exponential moving average of the weights, which is
   what gets saved;
4. the decoder alone trains on (as Stable Diffusion's ft-MSE VAE did). The encoder is fixed, so the
   UNet's latents stay valid and this stage may run beside stage 3 (``polish_decoder_stage``).

Then, when the plan gives these stages steps (the shipped model is the closed world: its plan gives
none), the closed world of shape scenes opens up (:mod:`diffusion_lora.toy.open_world`), starting
from the weights above:

5. the whole VAE trains on scenes in every base style mixed with generic pictures (textures and
   patterns, gradients, noise, line art, glyphs, colour fields, photographs), in two cosine cycles
   (the second at a lower peak learning rate), and its ``scaling_factor`` is measured again on that
   mix;
6. a fixed set of plain scenes (captioned by the template or a natural rewording) mixed with generic
   pictures and their captions is encoded once;
7. the UNet and the text encoder continue from stage 3's averaged weights on those latents, with the
   objective of stage 3 and a fresh optimizer and average.

Or, the other way out (``open_decoder_steps``, ``reword_steps``; a plan gives steps to one way only),
which keeps the encoder, and so every latent the UNet learned and every LoRA trained on them:

5b. the decoder alone (stage 4's loss) on the mix of stage 5, so it draws what the encoder's latents
    hold beyond the shape world;
7b. the text encoder alone learns that a reworded or short caption ("an orange star", "red box, big,
    grey background") means the template caption it stands for (size and background it leaves out set
    to a default: "a medium orange star on a white background"): its output for the rewording is pulled
    to stage 3's output for that template, and for the template captions, the empty caption and other
    text (made-up trigger words around or inside a caption) to their own. The UNet never changes, so the
    captions LoRAs train on mean what they meant.

Last, the VAE's posterior is made deterministic (:func:`deterministic_posterior`): every stage above
encodes and trains on the posterior's *mean*, so its variance was never trained (a small KL only pulls
it towards 1) and a sample would add noise the UNet never saw.

Held-out styles and families never enter (``open_world.check_trainable``). Work in progress is
checkpointed in ``work_dir`` after every stage and every ``checkpoint_every`` UNet steps, so a
killed run continues where it stopped.
"""

from __future__ import annotations

import copy
import logging
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from diffusion_lora.toy import open_world, scenes
from diffusion_lora.toy.base_model import WIDTH, build_untrained_pipeline, scheduler_config
from diffusion_lora.toy.shapes import COLOURS, SHAPES
from diffusion_lora.training.objectives import add_noise, ddpm_schedule, ddpm_target, snr

__all__ = ["BasePlan", "deterministic_posterior", "polish_decoder_stage", "train_base_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BasePlan:
    """Every number that decides the trained base model."""

    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    sharpen_steps: int = 1500
    sharpen_lr: float = 5e-4
    polish_steps: int = 2000
    polish_lr: float = 3e-4
    images: int = 24000
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 200
    decay_from: int = 3000  # the learning rate falls linearly from here to 0 at unet_steps
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    # The open world (stages 5–7). 0 steps keep the closed-world VAE and UNet, which the shipped model has.
    # The open run measured in issue 17 (not shipped: LoRAs trained on it learn the demo's style less well)
    # was --open-vae-steps 1500 --open-vae2-steps 1500 --open-unet-steps 3000 --reword-steps 0.
    photos: bool = True
    open_vae_steps: int = 0
    open_vae_lr: float = 4e-4
    open_vae_scene_share: float = 0.35
    open_vae2_steps: int = 0  # a second cycle, as stage 1b follows stage 1
    open_vae2_lr: float = 3e-4
    open_images: int = 24000
    open_scene_share: float = 0.7
    template_share: float = 0.4
    open_unet_steps: int = 0
    open_unet_lr: float = 4e-4
    open_warmup: int = 100
    open_decay_from: int = 1000
    # The frozen-encoder way out of the closed world (stages 5b and 7b): the encoder, and so every latent the
    # UNet learned, stays as stage 1 left it. 5b: the decoder alone on scenes mixed with generic pictures;
    # 7b: the text encoder alone learns that a reworded or short caption means its template caption.
    open_decoder_steps: int = 0  # measured in issue 17, not shipped (toy scenes reconstruct half as well)
    open_decoder_lr: float = 4e-4
    reword_steps: int = 3000  # shipped
    reword_lr: float = 1e-3
    reword_batch: int = 64
    reword_template_share: float = 0.3
    reword_held_share: float = 0.25
    # Channels of the first VAE and UNet block (then 2×, 2×): 32 is the shipped model.
    vae_width: int = WIDTH
    unet_width: int = WIDTH


@dataclass(frozen=True)
class _DenoiserRun:
    """One UNet + CLIP stage: its steps, learning-rate schedule, seed and checkpoint file."""

    steps: int
    lr: float
    warmup: int
    decay_from: int
    seed: int
    checkpoint: str

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to 0 from ``decay_from`` to ``steps``."""
        factor = min(1.0, (step + 1) / self.warmup)
        if step >= self.decay_from:
            factor *= max(0.0, (self.steps - step) / max(1, self.steps - self.decay_from))
        return factor


def _closed_run(plan: BasePlan) -> _DenoiserRun:
    return _DenoiserRun(plan.unet_steps, plan.unet_lr, plan.warmup, plan.decay_from, plan.seed + 2, "denoiser.pt")


def _open_run(plan: BasePlan) -> _DenoiserRun:
    return _DenoiserRun(plan.open_unet_steps, plan.open_unet_lr, plan.open_warmup, plan.open_decay_from,
                        plan.seed + 7, "denoiser-open.pt")


def _to_tensor(images: list, device: torch.device | str = "cpu") -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2) / 127.5 - 1.0


def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Shapes cover a small part of each image: weight their pixels up so colours come out exact,
    # and add the error of 4×4 averages, which is mostly colour.
    weight = 1.0 + 4.0 * ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1)
    err = recon - x
    coarse = F.avg_pool2d(err, 4)
    return (weight * (err.abs() + err.pow(2))).mean() + 2.0 * coarse.pow(2).mean()


def _vae_loss(vae, plan: BasePlan):
    """Reconstruction from the posterior's mean (not a sample: a deterministic autoencoder converges
    several times faster, and the UNet is trained on, and samples, means anyway) plus a small KL."""

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(x).latent_dist
        loss = _reconstruction_loss(vae.decode(posterior.mode()).sample, x)
        return loss + plan.kl_weight * posterior.kl().mean() / x[0].numel()

    return loss_of


# diffusers clamps the posterior's log-variance to [-30, 20]: its floor gives std e^-15 ≈ 3e-7
_LOGVAR_FLOOR = -30.0


def deterministic_posterior(vae) -> None:
    """Make ``vae.encode(x).latent_dist`` a point mass at its mean, in place: the log-variance half of
    ``quant_conv`` (its last ``latent_channels`` outputs) outputs the floor whatever the input, so
    ``latent_dist.sample()`` equals ``latent_dist.mean`` to within 3e-7 of the raw latent scale.

    The base model's VAE and UNet only ever use means (see :func:`_vae_loss`, :func:`_encode`), but a
    LoRA trainer encodes with ``latent_dist.sample()``, as kohya's, diffusers' and SimpleTuner's do:
    with the untrained variance (a std of about 0.4 of the latents' spread) every training latent
    carried noise worth 8–17 / 255 per pixel when decoded, and LoRAs learnt that noise as texture."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(_LOGVAR_FLOOR)


def _train_vae(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> None:
    vae = pipe.vae.train()
    rng = _fit_vae(list(vae.parameters()), _vae_loss(vae, plan), plan.seed, plan.vae_steps, plan.vae_lr,
                   plan.vae_batch, _scene_sampler(combos), "VAE",
                   lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, plan.vae_lr, total_steps=plan.vae_steps,
                                                                   pct_start=0.05))
    vae.eval()
    _measure_scaling_factor(pipe, rng, combos)


def _scene_sampler(combos: list):
    return lambda rng: scenes.render(open_world.vae_scene(rng, combos))


def _measure_scaling_factor(pipe: StableDiffusionPipeline, rng: random.Random, combos: list, sample=None) -> None:
    sample = sample or _scene_sampler(combos)
    with torch.no_grad():
        x = _to_tensor([sample(rng) for _ in range(256)], pipe.vae.device)
        std = pipe.vae.encode(x).latent_dist.mean.std().item()
    pipe.vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    logger.info("VAE scaling_factor %.5f", 1.0 / std)


def _sharpen_vae(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> None:
    """Stage 1's loss again at a lower, cosine-decaying learning rate, until colours come out exact."""
    vae = pipe.vae.train().requires_grad_(True)
    rng = _fit_vae(list(vae.parameters()), _vae_loss(vae, plan), plan.seed + 3, plan.sharpen_steps, plan.sharpen_lr,
                   plan.vae_batch, _scene_sampler(combos), "VAE sharpen")
    vae.eval().requires_grad_(False)
    _measure_scaling_factor(pipe, rng, combos)


def _polish_decoder(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> None:
    """Train the decoder alone, longer, for exact colours and edges. The encoder is fixed, so the
    latents the UNet learned stay valid and this stage may run beside the UNet stage."""
    _fit_decoder(pipe, _scene_sampler(combos), plan.seed + 4, plan.polish_steps, plan.polish_lr, plan.vae_batch,
                 "decoder polish")


def _fit_decoder(pipe: StableDiffusionPipeline, sample, seed: int, steps: int, lr: float, batch: int,
                 desc: str) -> None:
    """The decoder (and ``post_quant_conv``) alone reconstructs ``sample(rng)`` from the fixed encoder's means."""
    vae = pipe.vae.eval().requires_grad_(False)
    vae.decoder.requires_grad_(True).train()
    vae.post_quant_conv.requires_grad_(True)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mode()
        return _reconstruction_loss(vae.decode(latents).sample, x)

    _fit_vae([p for p in vae.parameters() if p.requires_grad], loss_of, seed, steps, lr, batch, sample, desc)
    vae.eval().requires_grad_(False)


def _fit_vae(params: list, loss_of, seed: int, steps: int, lr: float, batch: int, sample, desc: str,
             lr_schedule=None) -> random.Random:
    """AdamW on fresh pictures ``sample(rng)``, with ``lr_schedule(opt)`` (default: cosine decay over
    ``steps``); returns the picture generator for what follows."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = lr_schedule(opt) if lr_schedule else torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        loss = loss_of(_to_tensor([sample(rng) for _ in range(batch)], params[0].device))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return rng


def _untrained(plan: BasePlan, device: torch.device | str) -> StableDiffusionPipeline:
    return build_untrained_pipeline(plan.seed, plan.vae_width, plan.unet_width).to(device)


def polish_decoder_stage(work_dir: str | Path, plan: BasePlan = BasePlan(), device: torch.device | str = "cpu") -> None:
    """Stage 4 alone (it needs ``vae-sharp.pt`` in ``work_dir``), e.g. in a second process."""
    work_dir = Path(work_dir)
    pipe = _untrained(plan, device)
    _load_vae(pipe, work_dir / "vae-sharp.pt")
    _polish_decoder(pipe, plan, scenes.training_combos())
    _save_vae(pipe, work_dir / "decoder.pt")


def _save_atomic(value, path: Path) -> None:
    """``torch.save`` through ``path``'s ``.tmp`` sibling and a rename: a killed run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)


def _save_vae(pipe: StableDiffusionPipeline, path: Path) -> None:
    _save_atomic({"weights": pipe.vae.state_dict(), "scaling_factor": pipe.vae.config.scaling_factor}, path)


def _load_vae(pipe: StableDiffusionPipeline, path: Path) -> None:
    state = torch.load(path, weights_only=False, map_location=pipe.vae.device)
    pipe.vae.load_state_dict(state["weights"])
    pipe.vae.register_to_config(scaling_factor=state["scaling_factor"])


def _tokenize(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def _encode(pipe: StableDiffusionPipeline, images: list, captions: list[str]) -> dict[str, torch.Tensor]:
    latents = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), 64), desc="encode", unit="batch"):
            x = _to_tensor(images[start : start + 64], pipe.vae.device)
            latents.append((pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).cpu())
    return {"latents": torch.cat(latents), "ids": _tokenize(pipe, captions)}


def _encode_dataset(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> dict[str, torch.Tensor]:
    rng = random.Random(plan.seed + 1)
    items = [scenes.random_scene(rng, combos) for _ in range(plan.images)]
    return _encode(pipe, [scenes.render(s) for s in items], [s.caption for s in items])


# Words for the held text of stage 7b: the captions' own, and words a LoRA's captions add around them.
_KNOWN_WORDS = (*scenes.SIZES, *COLOURS, *SHAPES, *scenes.BACKGROUNDS, "a", "an", "on", "with", "of", "the",
                "background", "mascot", "picture", "photo", "style", "drawing", "in", ",")


def _held_text(scene: scenes.Scene, rng: random.Random) -> str:
    """A caption outside the rewordings, which stage 7b holds to its own output: a made-up word (as a
    LoRA's trigger word) before the template caption or in place of its colour and shape, both, or a
    run of made-up and known words."""
    def made_up() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))

    kind = rng.randrange(4)
    if kind == 3:
        return " ".join(made_up() if rng.random() < 0.4 else rng.choice(_KNOWN_WORDS) for _ in range(rng.randint(1, 9)))
    caption = scene.caption
    if kind != 0:
        caption = caption.replace(f"{scene.colour} {scene.shape}", made_up())
    return f"{made_up()}, {caption}" if kind != 1 else caption


def _reword_pairs(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> dict[str, torch.Tensor]:
    """Stage 3's scenes drawn again (only the draw), each as ``(caption, template it stands for)``: its
    template caption twice (``reword_template_share``), a held text twice (``reword_held_share``: see
    :func:`_held_text`), else a rewording (:func:`scenes.reworded`)."""
    rng, words = random.Random(plan.seed + 1), random.Random(plan.seed + 7)
    pairs = []
    for _ in range(plan.images):
        scene = scenes.random_scene(rng, combos)
        draw = words.random()
        if draw < plan.reword_template_share:
            pairs.append((scene.caption, scene.caption))
        elif draw < plan.reword_template_share + plan.reword_held_share:
            held = _held_text(scene, words)
            pairs.append((held, held))
        else:
            pairs.append(scenes.reworded(scene, words, combos))
    return {"ids": _tokenize(pipe, [a for a, _ in pairs]), "targets": _tokenize(pipe, [b for _, b in pairs])}


def _reword_text_encoder(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list, work_dir: Path,
                         until: int | None = None) -> bool:
    """Stage 7b (continuing ``text-reword.pt``): the text encoder's output for each caption is pulled to
    what it output, at the start of this stage, for the template caption the caption stands for; the
    template captions, held text and the empty caption to their own. With ``until``, stop after that step
    (checkpointed, as a killed run) and return False."""
    te = pipe.text_encoder
    device = te.device
    teacher = copy.deepcopy(te).eval().requires_grad_(False)  # on resume too: stage 3 ends in the same weights
    te.train().requires_grad_(True)
    steps = plan.reword_steps
    opt = torch.optim.AdamW(te.parameters(), lr=plan.reword_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / plan.open_warmup) * max(0.0, (steps - s) / steps))
    gen = torch.Generator().manual_seed(plan.seed + 8)
    start, ckpt = 0, work_dir / "text-reword.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        te.load_state_dict(state["te"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"].cpu())
        start = state["step"]
    stop = steps if until is None else min(steps, max(until, start))
    data = _reword_pairs(pipe, plan, combos) if start < stop else {}
    empty = _tokenize(pipe, [""])
    bar = tqdm(range(start, stop), desc="CLIP rewordings", unit="step", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, data["ids"].shape[0], (plan.reword_batch,), generator=gen)
        ids, targets = (torch.cat([data[k][idx], empty]).to(device) for k in ("ids", "targets"))
        with torch.no_grad():
            wanted = teacher(targets)[0]
        loss = (te(ids)[0] - wanted).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(te.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.5f}")
        if (step + 1) % plan.checkpoint_every == 0 or step + 1 in (steps, stop):
            _save_atomic({"te": te.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "gen": gen.get_state(), "step": step + 1}, ckpt)
    te.eval().requires_grad_(False)
    return stop == steps


def _encode_open_dataset(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> dict[str, torch.Tensor]:
    rng = random.Random(plan.seed + 6)
    families = open_world.base_families(plan.photos)
    items = [open_world.unet_item(rng, combos, families, plan.open_scene_share, plan.template_share)
             for _ in tqdm(range(plan.open_images), desc="draw", unit="image")]
    return _encode(pipe, [it.image for it in items], [it.caption for it in items])


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


def _train_denoiser(pipe: StableDiffusionPipeline, plan: BasePlan, run: _DenoiserRun, load_data,
                    work_dir: Path, until: int | None = None) -> bool:
    """Run ``run`` (continuing its checkpoint) on the latents ``load_data()`` gives, read only when
    steps remain; the UNet and text encoder end holding the average of the weights. With ``until``,
    stop after that step (checkpointed, as a killed run) and return False."""
    unet, te = pipe.unet.train(), pipe.text_encoder.train()
    device = unet.device
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, run.lr_factor)
    ema = [p.detach().clone() for p in params]
    schedule = ddpm_schedule(scheduler_config())
    empty = _tokenize(pipe, [""])[0]
    gen = torch.Generator().manual_seed(run.seed)
    start = 0
    ckpt = work_dir / run.checkpoint
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["te"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        for e, s in zip(ema, state["ema"]):
            e.copy_(s)
        gen.set_state(state["gen"].cpu())
        start = state["step"]
        logger.info("resuming %s at step %d", run.checkpoint, start)
    stop = run.steps if until is None else min(run.steps, max(until, start))
    data = load_data() if start < stop else {}
    bar = tqdm(range(start, stop), desc="UNet+CLIP", unit="step", initial=start, total=run.steps)
    for step in bar:
        idx = torch.randint(0, data["latents"].shape[0], (plan.unet_batch,), generator=gen)
        latents, ids = data["latents"][idx], data["ids"][idx].clone()
        drop = torch.rand(plan.unet_batch, generator=gen) < plan.caption_dropout
        ids[drop] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, schedule.num_train_timesteps, (plan.unet_batch,), generator=gen)
        # Every draw comes from the CPU generator, so a device changes the arithmetic, not the samples.
        latents, ids, noise, t = (v.to(device) for v in (latents, ids, noise, t))
        pred = unet(add_noise(latents, noise, t, schedule), t, te(ids)[0]).sample
        target = ddpm_target(latents, noise, t, schedule, schedule.prediction_type)
        # The v-loss is the x0-loss times (snr + 1); cap that factor at γ (min-SNR). Unlike the usual
        # min(snr, γ) / (snr + 1), this keeps full weight at the zero-SNR step, where layout is decided.
        weight = torch.clamp(plan.min_snr_gamma / (snr(t, schedule) + 1), max=1.0)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _ema_update(ema, [p.detach() for p in params], plan.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % plan.checkpoint_every == 0 or step + 1 in (run.steps, stop):
            state = {"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "ema": ema, "gen": gen.get_state(), "step": step + 1}
            _save_atomic(state, ckpt)
    if stop < run.steps:
        return False
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    te.eval()
    return True


def _cached(path: Path, make):
    """``make()``, saved at ``path``; or what an earlier run saved there."""
    if path.exists():
        return torch.load(path)
    value = make()
    _save_atomic(value, path)
    return value


def _open_decoder(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list) -> None:
    """Stage 5b: stage 4's loss (the decoder alone, the encoder fixed) on scenes in every base style mixed
    with generic pictures, so the decoder draws what the encoder's latents hold beyond the shape world."""
    families = open_world.base_families(plan.photos)
    _fit_decoder(pipe, lambda rng: open_world.vae_item(rng, combos, families, plan.open_vae_scene_share).image,
                 plan.seed + 9, plan.open_decoder_steps, plan.open_decoder_lr, plan.vae_batch, "decoder open world")


def _open_vae(pipe: StableDiffusionPipeline, plan: BasePlan, combos: list, cycle: int) -> None:
    """Stage 5: the whole VAE on scenes in every base style mixed with generic pictures; ``cycle`` 2 runs
    the same loss again from there at its own learning rate."""
    families = open_world.base_families(plan.photos)
    steps, lr = (plan.open_vae_steps, plan.open_vae_lr) if cycle == 1 else (plan.open_vae2_steps, plan.open_vae2_lr)

    def sample(rng: random.Random) -> Image.Image:
        return open_world.vae_item(rng, combos, families, plan.open_vae_scene_share).image

    vae = pipe.vae.train().requires_grad_(True)
    rng = _fit_vae(list(vae.parameters()), _vae_loss(vae, plan), plan.seed + 5 + 3 * (cycle - 1), steps, lr,
                   plan.vae_batch, sample, f"VAE open world {cycle}")
    vae.eval().requires_grad_(False)
    _measure_scaling_factor(pipe, rng, combos, sample)


def train_base_model(out_dir: str | Path, work_dir: str | Path, plan: BasePlan = BasePlan(),
                     until: int | None = None, device: torch.device | str = "cpu") -> StableDiffusionPipeline | None:
    """Train the base model by ``plan`` and save it as a diffusers folder at ``out_dir``. With ``until``,
    stop after that step of the open-world UNet stage or stage 7b (checkpointed in ``work_dir``, as a
    killed run would be) and return None; a later call continues from there. ``device`` (e.g.
    ``"cuda"``) runs the networks there; every random draw still comes from CPU generators."""
    work_dir = Path(work_dir)
    if (plan.open_decoder_steps or plan.reword_steps) and (plan.open_vae_steps or plan.open_vae2_steps
                                                          or plan.open_unet_steps):
        raise ValueError("the frozen-encoder stages (open_decoder_steps, reword_steps) and the retrained-VAE "
                         "stages (open_vae_steps, open_vae2_steps, open_unet_steps) are two alternative plans: "
                         "give steps to one of them")
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "plan.txt").write_text(repr(asdict(plan)))
    pipe = _untrained(plan, device)
    combos = scenes.training_combos()
    for name, stage in (("vae.pt", _train_vae), ("vae-sharp.pt", _sharpen_vae)):
        if (work_dir / name).exists():  # a finished stage of an earlier (killed) run
            _load_vae(pipe, work_dir / name)
        else:
            stage(pipe, plan, combos)
            _save_vae(pipe, work_dir / name)
    pipe.vae.eval().requires_grad_(False)
    _train_denoiser(pipe, plan, _closed_run(plan),
                    lambda: _cached(work_dir / "latents.pt", lambda: _encode_dataset(pipe, plan, combos)), work_dir)
    if not (work_dir / "decoder.pt").exists():
        polish_decoder_stage(work_dir, plan, device)
    _load_vae(pipe, work_dir / "decoder.pt")
    if plan.open_decoder_steps:
        if (work_dir / "decoder-open.pt").exists():
            _load_vae(pipe, work_dir / "decoder-open.pt")
        else:
            _open_decoder(pipe, plan, combos)
            _save_vae(pipe, work_dir / "decoder-open.pt")
    if plan.reword_steps and not _reword_text_encoder(pipe, plan, combos, work_dir, until):
        return None
    for cycle, steps, name in ((1, plan.open_vae_steps, "vae-open.pt"), (2, plan.open_vae2_steps, "vae-open-2.pt")):
        if not steps:
            continue
        if (work_dir / name).exists():
            _load_vae(pipe, work_dir / name)
        else:
            _open_vae(pipe, plan, combos, cycle)
            _save_vae(pipe, work_dir / name)
    if plan.open_unet_steps:
        done = _train_denoiser(
            pipe, plan, _open_run(plan),
            lambda: _cached(work_dir / "latents-open.pt", lambda: _encode_open_dataset(pipe, plan, combos)),
            work_dir, until)
        if not done:
            return None
    pipe.to("cpu")
    deterministic_posterior(pipe.vae)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
