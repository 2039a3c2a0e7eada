"""How each family turns captions and images into denoiser inputs, and calls its denoiser.

One :class:`Conditioner` per :class:`~diffusion_lora.families.Conditioning` value, chosen by the
family registry's ``conditioning`` field — no ``is_flux`` flags. Text encoding goes through the
pipeline's own ``encode_prompt`` so it matches inference exactly (and lets gradients reach a trained text encoder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..compat.diffusers import flux3_prompt_embeds, flux_latent_ids, modular_setting, pack_flux_latents
from ..errors import ConfigError
from ..families import Conditioning, Family, Variant
from .flux_inputs import control_channels, fill_channels, kontext_tokens

TextCond = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SizeInfo:
    """Per-sample image geometry SDXL conditions on: (height, width) pairs and the crop's top-left."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def latent_dist(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for ``pixels`` [B, 3, H, W] in [-1, 1].

    Cached instead of a sample, so that cached and uncached training draw the same latents from the
    same generator.
    """
    dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A latent sample, shifted and scaled the way the denoiser expects."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    latents = mean + std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def patchified_latents(vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A latent sample in the space of Flux.2 / Flux.3 denoisers: [B, C, h, w] → [B, 4C, h/2, w/2].

    Their VAE has no scaling factor: the pipelines patchify 2×2 (channel-major) and normalise with the
    VAE's BatchNorm running statistics (``vae.bn``), as ``Flux2Pipeline._encode_vae_image`` does.
    """
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    latents = mean + std * noise
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    return (latents - bn_mean) / bn_std


class Conditioner:
    """Family-specific latent space, text encoding and denoiser call."""

    # which image condition micro-steps build for ``predict``'s ``cond`` (see training.steps): None,
    # "reference" (Flux.1 Kontext), "control" (Control) or "fill" (Fill: masks and masked-image latents)
    image_condition: str | None = None

    def latents(self, vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A sample of the VAE latent distribution (mean, std), in the space the denoiser works in."""
        return sample_latents(vae, mean, std, generator)

    def image_seq_len(self, height: int, width: int) -> int:
        """Image tokens the denoiser sees for latents of ``height`` × ``width`` (Flux's 2×2 packing;
        a conditioner whose latents are already patchified counts every position)."""
        return (height // 2) * (width // 2)

    def check_trainable(self, pipe: Any) -> None:
        """Raise ConfigError when training cannot drive this pipeline's denoiser (every one can by default)."""

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        raise NotImplementedError

    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCond,
        sizes: Sequence[SizeInfo], guidance: float,
    ) -> torch.Tensor:
        """The denoiser's prediction. ``denoiser`` is the module to call — the pipeline's own, or the
        same module wrapped by accelerate for data-parallel training."""
        raise NotImplementedError


class UNetConditioner(Conditioner):
    """SD1.x / SD2.x: CLIP hidden states as cross-attention context."""

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        embeds, _ = pipe.encode_prompt(list(captions), device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance):  # noqa: ANN001
        return denoiser(noisy, timesteps, encoder_hidden_states=text["encoder_hidden_states"]).sample


class SDXLConditioner(Conditioner):
    """SDXL: two CLIP encoders, pooled embeddings and micro-conditioning on size and crop."""

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(captions), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance):  # noqa: ANN001
        time_ids = torch.tensor(
            [[*s.original_size, *s.crop_top_left, *s.target_size] for s in sizes], device=noisy.device,
            dtype=text["text_embeds"].dtype,
        )
        added = {"text_embeds": text["text_embeds"], "time_ids": time_ids}
        return denoiser(
            noisy, timesteps, encoder_hidden_states=text["encoder_hidden_states"], added_cond_kwargs=added
        ).sample


class SD3Conditioner(Conditioner):
    """SD3 / 3.5: joint attention on CLIP-L + CLIP-G + T5 embeddings, timesteps = σ·1000."""

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(captions), None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance):  # noqa: ANN001
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["encoder_hidden_states"],
            pooled_projections=text["pooled_projections"],
        ).sample


class FluxConditioner(Conditioner):
    """Flux.1: packed 2×2 latent patches, CLIP pooled + T5 context, guidance embedding, timestep = σ."""

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        embeds, pooled, text_ids = pipe.encode_prompt(list(captions), None, device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def transformer_inputs(self, pipe: Any, noisy: torch.Tensor,
                           cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, image position ids) the transformer gets for ``noisy`` [B, C, h, w] and ``cond``."""
        b, _, h, w = noisy.shape
        return pack_flux_latents(pipe, noisy), flux_latent_ids(pipe, b, h // 2, w // 2, noisy.device, noisy.dtype)

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance, cond=None):  # noqa: ANN001
        b, c, h, w = noisy.shape
        packed, image_ids = self.transformer_inputs(pipe, noisy, cond or {})
        guidance_tensor = None
        if pipe.transformer.config.guidance_embeds:
            guidance_tensor = torch.full((b,), float(guidance), device=noisy.device, dtype=noisy.dtype)
        pred = denoiser(
            hidden_states=packed, timestep=timesteps / 1000.0, guidance=guidance_tensor,
            pooled_projections=text["pooled_projections"], encoder_hidden_states=text["encoder_hidden_states"],
            txt_ids=text["txt_ids"], img_ids=image_ids,
        ).sample
        return _unpack(pred[:, : (h // 2) * (w // 2)], b, c, h, w)  # Kontext: the noisy tokens only


class FluxKontextConditioner(FluxConditioner):
    """Flux.1 Kontext: the reference image's tokens follow the noisy ones (``cond["reference"]``, latents
    [B, C, rh, rw]); without a reference it is plain Flux.1 text-to-image."""

    image_condition = "reference"

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance, cond=None):  # noqa: ANN001
        references = (cond or {}).get("references")  # a batch mixing paired and unpaired targets
        if references is None:
            return super().predict(pipe, denoiser, noisy, timesteps, text, sizes, guidance, cond)
        return torch.cat([
            super(FluxKontextConditioner, self).predict(
                pipe, denoiser, noisy[i : i + 1], timesteps[i : i + 1], text_cond_slice(text, i), sizes[i : i + 1],
                guidance, {} if ref is None else {"reference": ref})
            for i, ref in enumerate(references)
        ])

    def transformer_inputs(self, pipe, noisy, cond):  # noqa: ANN001, ANN201
        packed, ids = super().transformer_inputs(pipe, noisy, cond)
        reference = cond.get("reference")
        return (packed, ids) if reference is None else kontext_tokens(pipe, packed, ids, reference)


class FluxFillConditioner(FluxConditioner):
    """Flux.1 Fill: ``cond["masked"]`` (latents of the image with the mask's pixels zeroed) and
    ``cond["mask"]`` ([B, 1, H, W], 1 = repaint) on the channels; without them all is to be painted."""

    image_condition = "fill"

    def transformer_inputs(self, pipe, noisy, cond):  # noqa: ANN001, ANN201
        packed, ids = super().transformer_inputs(pipe, noisy, cond)
        b, _, h, w = noisy.shape
        vsf = pipe.vae_scale_factor
        masked = cond.get("masked", torch.zeros_like(noisy))
        mask = cond.get("mask", torch.ones(b, 1, h * vsf, w * vsf, device=noisy.device, dtype=noisy.dtype))
        return fill_channels(pipe, packed, masked, mask), ids


class FluxControlConditioner(FluxConditioner):
    """Flux.1 Control (Depth/Canny): ``cond["control"]`` (the control image's latents) on the channels."""

    image_condition = "control"

    def transformer_inputs(self, pipe, noisy, cond):  # noqa: ANN001, ANN201
        packed, ids = super().transformer_inputs(pipe, noisy, cond)
        return control_channels(pipe, packed, cond.get("control", torch.zeros_like(noisy))), ids


class ChromaConditioner(Conditioner):
    """Chroma: Flux.1's packed 2×2 latent patches and position ids, T5 context only (no pooled CLIP, no
    guidance embedding: its approximator sees only the timestep), timestep = σ, and a text attention mask.

    As ChromaPipeline does, T5 runs with the tokenizer's mask and the denoiser attends to the caption's
    tokens plus the first padding token (``encode_prompt``'s mask), then to every image token.
    """

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        embeds, text_ids, mask, *_ = pipe.encode_prompt(
            list(captions), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "attention_mask": mask, "txt_ids": text_ids}

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance):  # noqa: ANN001
        b, c, h, w = noisy.shape
        packed = pack_flux_latents(pipe, noisy)
        image_ids = flux_latent_ids(pipe, b, h // 2, w // 2, noisy.device, noisy.dtype)
        # ChromaPipeline._prepare_attention_mask: the text mask, then one (bool → the mask's dtype) per image token
        image_mask = torch.ones(b, packed.shape[1], device=noisy.device, dtype=torch.bool)
        mask = torch.cat([text["attention_mask"], image_mask], dim=1)
        pred = denoiser(
            hidden_states=packed, timestep=timesteps / 1000.0, encoder_hidden_states=text["encoder_hidden_states"],
            txt_ids=text["txt_ids"], img_ids=image_ids, attention_mask=mask,
        ).sample
        return _unpack(pred, b, c, h, w)


class Flux3Conditioner(Conditioner):
    """Flux.3: patchified BatchNorm-normalised latents as tokens (no 2×2 packing of its own), image ids with
    the pipeline's RoPE scale (0.5), a Qwen3-VL context per caption, timestep = σ, no guidance embedding.

    Each caption's context keeps its own length, as at inference (its chat-templated tokens right-padded
    to a multiple of 80; the transformer attends to that padding, so padding further would change the
    prediction). A batch holds the contexts zero-padded to the longest, with a ``text_mask`` of each one's window;
    :meth:`predict` runs the denoiser once per distinct length, on exactly the pipeline's inputs.
    """

    def check_trainable(self, pipe: Any) -> None:
        if pipe.transformer.config.get("flow_map", False):
            raise ConfigError(
                f"{pipe.config.get('_name_or_path') or type(pipe).__name__}: the step-distilled Flux.3 transformer "
                f"(flow_map=True) predicts jumps to a target timestep, and no training recipe for it is published; "
                f"train on the base model (flow_map=False) — its LoRA loads on the distilled one too"
            )

    def latents(self, vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return patchified_latents(vae, mean, std, generator)

    def image_seq_len(self, height: int, width: int) -> int:
        return height * width

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        self.check_trainable(pipe)
        embeds = [flux3_prompt_embeds(pipe, caption, device) for caption in captions]
        # text_mask: 1 over the caption's own window; batching pads it with 0 (a float, so caches store it)
        return text_cond_cat([{"prompt_embeds": e, "text_mask": e.new_ones(e.shape[:2])} for e in embeds])

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance):  # noqa: ANN001
        self.check_trainable(pipe)
        b, c, h, w = noisy.shape
        tokens = noisy.flatten(2).transpose(1, 2)  # [B, h·w, C], as Flux3PrepareLatentsStep packs them
        scale = modular_setting(pipe, "image_rope_scale", 0.5)
        grid = (torch.arange(1), torch.arange(h), torch.arange(w), torch.tensor([0]))
        img_ids = torch.cartesian_prod(*grid).to(dtype=torch.float32)
        img_ids[:, 1:3] = img_ids[:, 1:3] * scale
        img_ids = img_ids.to(noisy.device)
        sigma = (timesteps / 1000.0).to(noisy.dtype)
        lengths = (text["text_mask"] > 0).sum(dim=1).tolist()
        pred = torch.empty_like(tokens)
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            index = torch.tensor(rows, device=noisy.device)
            seq = torch.arange(length)
            txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), seq).to(torch.float32)
            out = denoiser(
                hidden_states=tokens if len(rows) == b else tokens[index],
                encoder_hidden_states=text["prompt_embeds"][index, :length].to(noisy.dtype),
                timestep=sigma if len(rows) == b else sigma[index],
                img_ids=img_ids, txt_ids=txt_ids.to(noisy.device), return_dict=False,
            )[0]
            pred[index] = out.to(pred.dtype)
        return pred.transpose(1, 2).reshape(b, c, h, w)


class Flux2Conditioner(Conditioner):
    """Flux.2 dev and Klein: patchified, BatchNorm-normalised latents as plain tokens, 4-axis position ids
    (time, row, column, layer), stacked LLM hidden states as context, timestep = σ; dev also embeds the
    guidance scale, Klein has no guidance embedding.

    The latents are already 2×2-patchified by :func:`patchified_latents` ([B, 128, H/16, W/16] for the real
    VAE), so every latent position is one token, and the prediction comes back in that layout.
    """

    def latents(self, vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return patchified_latents(vae, mean, std, generator)

    def image_seq_len(self, height: int, width: int) -> int:
        return height * width

    def encode_text(self, pipe: Any, captions: Sequence[str], device: torch.device) -> TextCond:
        # the pipeline's own defaults: 512 tokens, its default hidden layers (Mistral 10/20/30, Qwen3 9/18/27)
        embeds, text_ids = pipe.encode_prompt(prompt=list(captions), device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids[0]}  # text positions are the same per prompt

    def predict(self, pipe, denoiser, noisy, timesteps, text, sizes, guidance):  # noqa: ANN001
        b, c, h, w = noisy.shape
        tokens = noisy.reshape(b, c, h * w).permute(0, 2, 1)  # as Flux2Pipeline._pack_latents
        zero = torch.arange(1, device=noisy.device)
        # (0, row, column, 0) per token, row-major: Flux2Pipeline._prepare_latent_ids
        image_ids = torch.cartesian_prod(zero, torch.arange(h, device=noisy.device),
                                         torch.arange(w, device=noisy.device), zero)
        guidance_tensor = None
        if pipe.transformer.config.guidance_embeds:
            guidance_tensor = torch.full((b,), float(guidance), device=noisy.device, dtype=torch.float32)
        pred = denoiser(
            hidden_states=tokens, timestep=timesteps / 1000, guidance=guidance_tensor,
            encoder_hidden_states=text["encoder_hidden_states"], txt_ids=text["txt_ids"], img_ids=image_ids,
        ).sample
        return pred.permute(0, 2, 1).reshape(b, c, h, w)


def _unpack(packed: torch.Tensor, b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of Flux's 2×2 patch packing: [B, (h/2)(w/2), 4c] → [B, c, h, w]."""
    x = packed.view(b, h // 2, w // 2, c, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


_CONDITIONERS: Mapping[Conditioning, Conditioner] = MappingProxyType({
    Conditioning.UNET: UNetConditioner(),
    Conditioning.SDXL: SDXLConditioner(),
    Conditioning.SD3: SD3Conditioner(),
    Conditioning.FLUX: FluxConditioner(),
    Conditioning.FLUX_KONTEXT: FluxKontextConditioner(),
    Conditioning.FLUX_FILL: FluxFillConditioner(),
    Conditioning.FLUX_CONTROL: FluxControlConditioner(),
    Conditioning.CHROMA: ChromaConditioner(),
    Conditioning.FLUX3: Flux3Conditioner(),
    Conditioning.FLUX2: Flux2Conditioner(),
})


def conditioner_for(family: Family, variant: Variant | None = None) -> Conditioner:
    """The conditioner of ``variant``'s conditioning (the family's when no variant is given)."""
    conditioning = (variant.conditioning if variant is not None else None) or family.conditioning
    return _CONDITIONERS[conditioning]


def text_cond_slice(text: TextCond, index: int) -> TextCond:
    """Sample ``index`` of a batch of text conditions, keeping the batch dimension (txt_ids has none)."""
    return {k: (v if k == "txt_ids" else v[index : index + 1]) for k, v in text.items()}


def text_cond_cat(parts: Sequence[TextCond]) -> TextCond:
    """Concatenate per-sample text conditions along the batch (txt_ids is shared).

    Conditions of different lengths (Flux.3's text windows) are zero-padded at the end of dim 1 to the
    longest; a conditioner that makes them also records each sample's own length.
    """
    keys = parts[0].keys()
    return {k: (parts[0][k] if k == "txt_ids" else _cat_padded([p[k] for p in parts])) for k in keys}


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(list(tensors))
    longest = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in tensors])
