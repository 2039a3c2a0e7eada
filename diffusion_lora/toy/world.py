"""Generic 64×64 pictures beyond the shape scenes: the open world the embedded base model learns.

Each *family* is a renderer ``(rng, jitter) -> (RGB uint8 [64, 64, 3], caption)``: textures and
patterns at many scales and angles, gradients, noise, line art, glyphs, flat colour fields and
(when scikit-image's bundled sample photographs are installed) crops of natural photographs. Colours
are named ones (so the caption tells the truth), shifted a little when ``jitter`` is set (the VAE
sees every colour, the UNet reads names).

:data:`TRAINING_FAMILIES` are what the base model trains on; :data:`HELD_OUT_FAMILIES` are never
shown to it and measure how well its VAE reconstructs looks it has not seen
(:func:`held_out_images`). Everything is a pure function of the seed.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion_lora.toy.scenes import BACKGROUNDS
from diffusion_lora.toy.shapes import COLOURS

__all__ = [
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "HELD_OUT_PHOTOS",
    "NAMED_COLOURS",
    "TRAINING_FAMILIES",
    "TRAINING_PHOTOS",
    "held_out_images",
    "photos_available",
    "render_family",
]

SIZE = 64
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    **BACKGROUNDS,  # white, black, gray
    "brown": (120, 75, 40),
    "navy": (25, 35, 95),
    "beige": (225, 205, 165),
    "teal": (20, 120, 120),
}
Rendered = tuple[np.ndarray, str]
Renderer = Callable[[np.random.Generator, bool], Rendered]

# scikit-image's bundled sample photographs (public domain or CC0 by its data module's notes).
TRAINING_PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "camera", "brick", "grass", "coins", "moon")
HELD_OUT_PHOTOS = ("coffee", "gravel")
_PHOTO_FILES = {"hubble_deep_field": "hubble_deep_field.jpg", "rocket": "rocket.jpg"}


# ---------------------------------------------------------------- helpers


def _pick(rng: np.random.Generator, jitter: bool, avoid: tuple[str, ...] = ()) -> tuple[str, np.ndarray]:
    names = [n for n in NAMED_COLOURS if n not in avoid]
    name = names[rng.integers(len(names))]
    rgb = np.array(NAMED_COLOURS[name], dtype=np.float32)
    if jitter:
        rgb = np.clip(rgb + rng.normal(0, 18, 3), 0, 255)
    return name, rgb


def _two(rng: np.random.Generator, jitter: bool) -> tuple[str, np.ndarray, str, np.ndarray]:
    a, ca = _pick(rng, jitter)
    b, cb = _pick(rng, jitter, avoid=(a,))
    return a, ca, b, cb


def _grid(supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    n = SIZE * supersample
    c = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    return np.meshgrid(c, c)  # x, y in pixels of the 64×64 image


def _down(a: np.ndarray, supersample: int) -> np.ndarray:
    if supersample == 1:
        return a
    n = SIZE
    return a.reshape(n, supersample, n, supersample, *a.shape[2:]).mean(axis=(1, 3))


def _mix(t: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Per-pixel blend from ``ca`` (t = 0) to ``cb`` (t = 1)."""
    return ca + (cb - ca) * t[..., None]


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _rotated(rng: np.random.Generator, supersample: int) -> tuple[np.ndarray, np.ndarray, float]:
    x, y = _grid(supersample)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    return u, v, angle


def _orientation(angle: float) -> str:
    deg = math.degrees(angle) % 180
    if deg < 15 or deg > 165:
        return "vertical "
    if 75 < deg < 105:
        return "horizontal "
    return "diagonal "


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A [64, 64] field in [0, 1]: random values on a ``cells``² grid, bicubically upsampled."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.clip(np.asarray(grid.resize((SIZE, SIZE), Image.Resampling.BICUBIC)), 0, 1)


def _fractal(rng: np.random.Generator, base: int, octaves: int) -> np.ndarray:
    total, amp, norm = np.zeros((SIZE, SIZE), np.float32), 1.0, 0.0
    for o in range(octaves):
        total += amp * _smooth_noise(rng, min(SIZE, base * 2**o))
        norm += amp
        amp *= 0.5
    field = total / norm
    lo, hi = field.min(), field.max()
    return (field - lo) / max(hi - lo, 1e-6)


# ---------------------------------------------------------------- training families


def _stripes(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    u, _, angle = _rotated(rng, 4)
    period, duty = rng.uniform(3, 20), rng.uniform(0.3, 0.7)
    t = (((u / period + rng.random()) % 1.0) < duty).astype(np.float32)
    return _to_uint8(_down(_mix(t, ca, cb), 4)), f"{_orientation(angle)}{a} and {b} stripes"


def _checks(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    u, v, _ = _rotated(rng, 4) if rng.random() < 0.5 else (*_grid(4), 0.0)
    cell = rng.uniform(3, 16)
    t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    return _to_uint8(_down(_mix(t, ca, cb), 4)), f"a {a} and {b} checkerboard"


def _dots(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    u, v, _ = _rotated(rng, 4)
    spacing = rng.uniform(5, 16)
    radius = spacing * rng.uniform(0.15, 0.42)
    du, dv = (u / spacing) % 1.0 - 0.5, (v / spacing) % 1.0 - 0.5
    t = ((du**2 + dv**2) * spacing**2 < radius**2).astype(np.float32)
    return _to_uint8(_down(_mix(t, ca, cb), 4)), f"{b} polka dots on {a}"


def _gradient(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    u, _, _ = _rotated(rng, 1)
    t = (u - u.min()) / (u.max() - u.min())
    return _to_uint8(_mix(t, ca, cb)), f"a smooth gradient from {a} to {b}"


def _radial(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    x, y = _grid()
    cx, cy = rng.uniform(0, SIZE, 2)
    r = np.hypot(x - cx, y - cy)
    t = np.clip(r / rng.uniform(24, 80), 0, 1)
    return _to_uint8(_mix(t, ca, cb)), f"a radial gradient, {a} in the middle fading to {b}"


def _clouds(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    t = _fractal(rng, int(rng.integers(2, 9)), int(rng.integers(1, 5)))
    if rng.random() < 0.3:  # three independent channels: a colourful noise
        t3 = np.stack([t, _fractal(rng, 4, 3), _fractal(rng, 4, 3)], axis=-1)
        return _to_uint8(t3 * 255), "a colourful noise texture"
    return _to_uint8(_mix(t, ca, cb)), f"a {a} and {b} cloudy noise texture"


def _grain(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca = _pick(rng, jitter)
    sigma = rng.uniform(4, 45)
    base = np.broadcast_to(ca, (SIZE, SIZE, 3))
    if rng.random() < 0.5:
        noise = rng.normal(0, sigma, (SIZE, SIZE, 1))  # monochrome grain
    else:
        noise = rng.normal(0, sigma, (SIZE, SIZE, 3))
    return _to_uint8(base + noise), f"grainy {a} noise"


def _lines(rng: np.random.Generator, jitter: bool) -> Rendered:
    bg, cbg, ink, cink = _two(rng, jitter)
    k = 4
    image = Image.new("RGB", (SIZE * k, SIZE * k), tuple(int(c) for c in cbg))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in cink)
    for _ in range(int(rng.integers(2, 10))):
        width = int(rng.integers(1, 4)) * k
        kind = rng.integers(4)
        pts = [tuple(float(p) for p in rng.uniform(-8, SIZE + 8, 2) * k) for _ in range(int(rng.integers(2, 6)))]
        if kind == 0:
            draw.line(pts[:2], fill=colour, width=width)
        elif kind == 1:
            draw.line(pts, fill=colour, width=width, joint="curve")
        elif kind == 2:
            cx, cy = rng.uniform(0, SIZE, 2) * k
            r = rng.uniform(3, 24) * k
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
        else:
            cx, cy = rng.uniform(0, SIZE, 2) * k
            r = rng.uniform(4, 28) * k
            start = rng.uniform(0, 360)
            draw.arc((cx - r, cy - r, cx + r, cy + r), start, start + rng.uniform(60, 300), fill=colour, width=width)
    small = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small), f"a {ink} line drawing on {bg}"


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


_GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789&?#@"


def _glyphs(rng: np.random.Generator, jitter: bool) -> Rendered:
    bg, cbg, ink, cink = _two(rng, jitter)
    k = 2
    image = Image.new("RGB", (SIZE * k, SIZE * k), tuple(int(c) for c in cbg))
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(8, 40))
    font = _font(size * k)
    text = "".join(_GLYPHS[i] for i in rng.integers(len(_GLYPHS), size=int(rng.integers(1, 12))))
    lines = max(1, min(6, 64 // size))
    for row in range(int(rng.integers(1, lines + 1))):
        x, y = rng.uniform(-4, 40) * k, (rng.uniform(-4, 8) + row * size * 1.1) * k
        draw.text((x, y), text[row::lines] or text, fill=tuple(int(c) for c in cink), font=font)
    small = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small), f"{ink} letters on {bg}"


def _blocks(rng: np.random.Generator, jitter: bool) -> Rendered:
    names = []
    bg, cbg = _pick(rng, jitter)
    out = np.broadcast_to(cbg, (SIZE, SIZE, 3)).copy()
    x, y = _grid()
    if rng.random() < 0.5:  # overlapping flat rectangles
        for _ in range(int(rng.integers(2, 9))):
            name, c = _pick(rng, jitter)
            names.append(name)
            x0, x1 = sorted(rng.uniform(-8, SIZE + 8, 2))
            y0, y1 = sorted(rng.uniform(-8, SIZE + 8, 2))
            out[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)] = c
    else:  # flat Voronoi cells
        n = int(rng.integers(3, 12))
        centres = rng.uniform(0, SIZE, (n, 2))
        d = (x[..., None] - centres[:, 0]) ** 2 + (y[..., None] - centres[:, 1]) ** 2
        owner = d.argmin(axis=-1)
        for i in range(n):
            name, c = _pick(rng, jitter)
            names.append(name)
            out[owner == i] = c
    main = sorted(set(names))[:3] or [bg]
    return _to_uint8(out), "flat blocks of " + ", ".join(main)


def _waves(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    x, y = _grid()
    field = np.zeros_like(x)
    for _ in range(int(rng.integers(1, 4))):
        angle, period = rng.uniform(0, 2 * math.pi), rng.uniform(6, 40)
        field += np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period + rng.uniform(0, 6.3))
    t = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    return _to_uint8(_mix(t, ca, cb)), f"soft {a} and {b} waves"


# ---------------------------------------------------------------- photographs


def photos_available() -> bool:
    """Whether scikit-image's sample photographs are installed (``pip install scikit-image``)."""
    return _photo_dir() is not None


def _photo_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")  # only locate the package: its files are read as plain PNG/JPEG
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    names = TRAINING_PHOTOS + HELD_OUT_PHOTOS
    return folder if all((folder / _PHOTO_FILES.get(n, f"{n}.png")).is_file() for n in names) else None


@lru_cache(maxsize=32)
def _photo(name: str) -> np.ndarray:
    folder = _photo_dir()
    if folder is None:
        raise FileNotFoundError("the photo family needs scikit-image's sample images: pip install scikit-image")
    with Image.open(folder / _PHOTO_FILES.get(name, f"{name}.png")) as im:
        return np.asarray(im.convert("RGB"))


def _crop(rng: np.random.Generator, names: tuple[str, ...]) -> np.ndarray:
    photo = _photo(names[rng.integers(len(names))])
    h, w = photo.shape[:2]
    side = int(rng.uniform(48, min(h, w)))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _photos(rng: np.random.Generator, jitter: bool) -> Rendered:
    out = _crop(rng, TRAINING_PHOTOS).astype(np.float32)
    if jitter:  # brightness, contrast and a colour cast
        out = (out - 128) * rng.uniform(0.7, 1.3) + 128 + rng.normal(0, 12, 3)
    return _to_uint8(out), "a photo"


# ---------------------------------------------------------------- held-out families (never trained on)


def _rings(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    x, y = _grid(4)
    cx, cy = rng.uniform(-16, SIZE + 16, 2)
    t = (((np.hypot(x - cx, y - cy) / rng.uniform(4, 14)) % 1.0) < 0.5).astype(np.float32)
    return _to_uint8(_down(_mix(t, ca, cb), 4)), f"{a} and {b} concentric rings"


def _plaid(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    _, cc = _pick(rng, jitter)
    x, y = _grid(4)
    out = np.broadcast_to(ca, x.shape + (3,)).copy()
    for coord, colour in ((x, cb), (y, cc)):
        period = rng.uniform(8, 24)
        band = ((coord / period + rng.random()) % 1.0) < rng.uniform(0.2, 0.45)
        out[band] = 0.5 * out[band] + 0.5 * colour
    return _to_uint8(_down(out, 4)), f"{a} and {b} plaid"


def _zigzag(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    x, y = _grid(4)
    period, amp, width = rng.uniform(8, 24), rng.uniform(2, 8), rng.uniform(4, 14)
    tri = np.abs((x / period) % 1.0 - 0.5) * 2 * amp
    t = ((((y + tri) / width) % 1.0) < 0.5).astype(np.float32)
    return _to_uint8(_down(_mix(t, ca, cb), 4)), f"{a} and {b} zigzags"


def _conic(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    x, y = _grid()
    cx, cy = rng.uniform(8, SIZE - 8, 2)
    t = (np.arctan2(y - cy, x - cx) / (2 * math.pi) + 0.5 + rng.random()) % 1.0
    t = np.abs(t * 2 - 1)  # continuous around the circle
    return _to_uint8(_mix(t, ca, cb)), f"a conic gradient of {a} and {b}"


def _mosaic(rng: np.random.Generator, jitter: bool) -> Rendered:
    cells = int(rng.integers(4, 11))
    colours = np.stack([_pick(rng, jitter)[1] for _ in range(cells * cells)]).reshape(cells, cells, 3)
    image = Image.fromarray(_to_uint8(colours)).resize((SIZE, SIZE), Image.Resampling.NEAREST)
    return np.asarray(image), "a mosaic of coloured tiles"


def _hatching(rng: np.random.Generator, jitter: bool) -> Rendered:
    bg, cbg, ink, cink = _two(rng, jitter)
    k = 4
    image = Image.new("RGB", (SIZE * k, SIZE * k), tuple(int(c) for c in cbg))
    draw = ImageDraw.Draw(image)
    for angle in rng.uniform(0, math.pi, int(rng.integers(1, 3))):
        gap = rng.uniform(3, 8)
        dx, dy = math.cos(angle), math.sin(angle)
        for offset in np.arange(-SIZE, 2 * SIZE, gap):
            ox, oy = -dy * offset + rng.normal(0, 0.4), dx * offset + rng.normal(0, 0.4)
            draw.line([((ox - dx * 2 * SIZE) * k, (oy - dy * 2 * SIZE) * k),
                       ((ox + dx * 2 * SIZE) * k, (oy + dy * 2 * SIZE) * k)], fill=tuple(int(c) for c in cink), width=k)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX)), f"{ink} cross-hatching on {bg}"


def _marble(rng: np.random.Generator, jitter: bool) -> Rendered:
    a, ca, b, cb = _two(rng, jitter)
    x, y = _grid()
    warp = _fractal(rng, 4, 4) * rng.uniform(6, 20)
    t = 0.5 + 0.5 * np.sin((x + y) * 2 * math.pi / rng.uniform(10, 30) + warp)
    return _to_uint8(_mix(t, ca, cb)), f"{a} and {b} marble"


def _held_out_photo(rng: np.random.Generator, jitter: bool) -> Rendered:
    return _crop(rng, HELD_OUT_PHOTOS), "a photo"


FAMILIES: dict[str, Renderer] = {
    "stripes": _stripes, "checks": _checks, "dots": _dots, "gradient": _gradient, "radial": _radial,
    "clouds": _clouds, "grain": _grain, "lines": _lines, "glyphs": _glyphs, "blocks": _blocks, "waves": _waves,
    "photos": _photos,
    "rings": _rings, "plaid": _plaid, "zigzag": _zigzag, "conic": _conic, "mosaic": _mosaic, "hatching": _hatching,
    "marble": _marble, "held-out photos": _held_out_photo,
}
TRAINING_FAMILIES: tuple[str, ...] = (
    "stripes", "checks", "dots", "gradient", "radial", "clouds", "grain", "lines", "glyphs", "blocks", "waves",
    "photos",
)
HELD_OUT_FAMILIES: tuple[str, ...] = (
    "rings", "plaid", "zigzag", "conic", "mosaic", "hatching", "marble", "held-out photos",
)


def render_family(family: str, rng: np.random.Generator, jitter: bool = False) -> Rendered:
    """One ``(image, caption)`` of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown image family {family!r}; expected one of {sorted(FAMILIES)}")
    image, caption = FAMILIES[family](rng, jitter)
    return np.ascontiguousarray(image, dtype=np.uint8), caption


def held_out_images(family: str, count: int = 64, seed: int = 4321) -> list[Image.Image]:
    """``count`` images of a held-out family (the VAE reconstruction test set), fixed by ``seed``."""
    if family not in HELD_OUT_FAMILIES:
        raise ValueError(f"{family!r} is not a held-out family; expected one of {HELD_OUT_FAMILIES}")
    rng = np.random.default_rng([seed, HELD_OUT_FAMILIES.index(family)])
    return [Image.fromarray(render_family(family, rng, jitter=True)[0]) for _ in range(count)]
