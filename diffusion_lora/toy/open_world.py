"""What the open-world base model trains on: shape scenes mixed with generic pictures.

The VAE learns from scenes in every base style (and the mascot) mixed with every training family of
:mod:`diffusion_lora.toy.world`; the UNet and text encoder learn from plain scenes, half of them
captioned in natural rewordings (:func:`~diffusion_lora.toy.scenes.caption_variant`), mixed with
generic pictures and their captions. Held-out styles and held-out families never enter: every item
passes :func:`check_trainable`, so a change that would leak one fails loudly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffusion_lora.toy import scenes, styles, world

__all__ = ["Item", "base_families", "check_trainable", "unet_item", "vae_item", "vae_scene"]


@dataclass(frozen=True)
class Item:
    kind: str  # "scene" | "family"
    name: str  # the scene's style, or the family's name
    caption: str
    image: Image.Image


def base_families(photos: bool) -> tuple[str, ...]:
    """The training families; ``photos`` needs scikit-image's sample photographs installed."""
    if photos and not world.photos_available():
        raise RuntimeError("the base plan trains on photographs (plan.photos), which come with scikit-image: "
                           "pip install scikit-image, or set --photos false")
    return tuple(f for f in world.TRAINING_FAMILIES if photos or f != "photos")


def check_trainable(item: Item) -> Item:
    """``item``, unless it is drawn in a held-out style or family (then a ValueError)."""
    if item.name in styles.HELD_OUT_STYLES or item.name in world.HELD_OUT_FAMILIES:
        raise ValueError(f"{item.kind} {item.name!r} is held out of base training")
    return item


def _np_rng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(64))


def _family(rng: random.Random, families: tuple[str, ...], jitter: bool) -> Item:
    name = rng.choice(families)
    image, caption = world.render_family(name, _np_rng(rng), jitter=jitter)
    return Item("family", name, caption, Image.fromarray(image))


def _scene(scene: scenes.Scene, caption: str) -> Item:
    return Item("scene", scene.style, caption, scenes.render(scene))


def vae_scene(rng: random.Random, combos: list) -> scenes.Scene:
    """A scene for the VAE: a random base style, and 15 % of the time the mascot."""
    scene = scenes.random_scene(rng, combos, style=rng.choice(styles.STYLES))
    if rng.random() < 0.15:
        scene = scenes.Scene(styles.MASCOT, styles.MASCOT_COLOUR, scene.size, scene.background, scene.cx, scene.cy,
                             scene.style)
    return scene


def vae_item(rng: random.Random, combos: list, families: tuple[str, ...], scene_share: float) -> Item:
    """A VAE training picture: :func:`vae_scene`, else a family's."""
    if rng.random() >= scene_share:
        return check_trainable(_family(rng, families, jitter=True))
    scene = vae_scene(rng, combos)
    return check_trainable(_scene(scene, scene.caption))


def unet_item(rng: random.Random, combos: list, families: tuple[str, ...], scene_share: float,
              template_share: float) -> Item:
    """A UNet training picture: a plain scene (its template caption or a rewording), else a family's."""
    if rng.random() >= scene_share:
        return check_trainable(_family(rng, families, jitter=False))
    scene = scenes.random_scene(rng, combos)
    caption = scene.caption if rng.random() < template_share else scenes.caption_variant(scene, rng)
    return check_trainable(_scene(scene, caption))
