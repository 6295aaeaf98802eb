"""The embedded toy dataset: a deterministic VOC-layout segmentation set drawn from a seed.

Shapes are the class cue (eight shape families); textures are crops of the photos bundled with
scikit-image and procedural noise, colour-jittered and shared between classes so that neither
colour nor texture alone names the class. Two classes ("boat", "horse") usually sit on a
class-typical background ("water", "grass") that also appears without them, so a classifier
can learn to fire on context, the failure mode WSSS methods fight on VOC. Masks are VOC-like:
palette PNGs with a thin 255 band on every object border.

Every image is drawn from its own generator seeded by (seed, split, index), so the bytes of an
image depend only on those three numbers and the config, never on the split sizes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage
from skimage.segmentation import find_boundaries

from ..errors import ConfigError
from ..io import atomic_dir, label_image
from .palette import IGNORE

# --------------------------------------------------------------------------------------------
# Statistics knobs (module constants; ToyConfig bundles them so tests can read and vary them)
# --------------------------------------------------------------------------------------------

#: foreground classes, label 1..8 in this order (label 0 is "background")
CLASS_NAMES: tuple[str, ...] = (
    "polygon", "ellipse", "star", "ring", "horse", "cross", "crescent", "boat",
)
#: probability of each foreground class for every object (sampled with replacement)
CLASS_PROBS: tuple[float, ...] = (1 / 8,) * 8
#: P(1 object), P(2 objects), P(3 objects) planned per image (before occlusion drops)
OBJECTS_PER_IMAGE_PROBS: tuple[float, ...] = (0.5, 0.3, 0.2)
#: object extent (its canonical diameter) as a fraction of the image's long side
OBJECT_SCALE_RANGE: tuple[float, float] = (0.30, 0.65)
#: short side / long side
ASPECT_RANGE: tuple[float, float] = (0.75, 1.0)
#: probability that the long side is the width (VOC is mostly landscape)
LANDSCAPE_PROB: float = 0.7
#: class -> its typical background
CONTEXT_BACKGROUNDS: tuple[tuple[str, str], ...] = (("boat", "water"), ("horse", "grass"))
#: P(an image with a contextual class uses that class's background); otherwise (and for images
#: without one) the background is drawn from BACKGROUND_PROBS, which includes the contextual
#: backgrounds, so P(water | boat) = 0.75 + 0.25 * 0.12 = 0.78 when boat is the only contextual
#: class present.
CONTEXT_PROB: float = 0.75
#: background texture -> probability, for images not forced onto a contextual background
BACKGROUND_PROBS: tuple[tuple[str, float], ...] = (
    ("water", 0.12), ("grass", 0.12),
    ("brick", 0.076), ("gravel", 0.076), ("text", 0.076), ("camera", 0.076), ("moon", 0.076),
    ("coffee", 0.076), ("hubble", 0.076), ("chelsea", 0.076), ("noise", 0.076),
    ("stripes", 0.076),
)
#: the texture pool of each class; every texture serves 3-4 classes, so texture is a weak cue
CLASS_TEXTURES: tuple[tuple[str, ...], ...] = (
    ("brick", "astronaut", "moon", "noise", "coffee"),      # polygon
    ("gravel", "rocket", "coins", "stripes", "brick"),      # ellipse
    ("coffee", "hubble", "camera", "noise", "gravel"),      # star
    ("astronaut", "chelsea", "moon", "stripes", "hubble"),  # ring
    ("rocket", "coins", "camera", "brick", "chelsea"),      # horse
    ("hubble", "gravel", "astronaut", "coins", "noise"),    # cross
    ("chelsea", "stripes", "coffee", "rocket", "camera"),   # crescent
    ("moon", "noise", "brick", "hubble", "coins"),          # boat
)
#: half-width in pixels of the 255 band: pixels within this distance of an instance border
#: (on either side) are ignore, so the band is 2 * BORDER_WIDTH pixels wide
BORDER_WIDTH: int = 1
#: an occluded object is dropped (from image and mask) when less than this fraction of its
#: in-image area stays visible ...
MIN_VISIBLE_FRACTION: float = 0.3
#: ... or when its visible area is below this fraction of the image area
MIN_VISIBLE_AREA: float = 0.008
#: minimum RGB distance (0..sqrt(3)) between an object's mean colour and the background's
#: mean colour under it; lower-contrast objects are pushed apart so shapes stay visible
MIN_CONTRAST: float = 0.15
#: probability that an object's texture is re-coloured in its class's tint (the luminance of
#: the photo crop kept) instead of a random colour: colour is then a partial cue, as on VOC
#: (skies are blue, grass is green), which makes the classes learnable from scratch on a CPU
#: in minutes, while the other objects of a class (and shared textures) still require shape
CLASS_TINT_PROB: float = 0.6
#: (dark, light) duotone of each class's tint, same order as CLASS_NAMES
CLASS_TINTS: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.45, 0.05, 0.05), (1.00, 0.55, 0.50)),  # polygon: red
    ((0.05, 0.30, 0.05), (0.55, 1.00, 0.45)),  # ellipse: green
    ((0.45, 0.40, 0.00), (1.00, 0.95, 0.45)),  # star: yellow
    ((0.05, 0.05, 0.45), (0.50, 0.55, 1.00)),  # ring: blue
    ((0.30, 0.15, 0.05), (0.85, 0.60, 0.35)),  # horse: brown
    ((0.40, 0.05, 0.40), (1.00, 0.55, 1.00)),  # cross: magenta
    ((0.05, 0.35, 0.40), (0.45, 1.00, 1.00)),  # crescent: cyan
    ((0.50, 0.20, 0.00), (1.00, 0.70, 0.30)),  # boat: orange
)
JPEG_QUALITY: int = 95

SPLIT_TRAIN_AUG = 0
SPLIT_VAL = 1


@dataclass(frozen=True)
class ToyConfig:
    """The generator's knobs; the defaults are the module constants above."""

    class_names: tuple[str, ...] = CLASS_NAMES
    class_probs: tuple[float, ...] = CLASS_PROBS
    objects_per_image_probs: tuple[float, ...] = OBJECTS_PER_IMAGE_PROBS
    object_scale_range: tuple[float, float] = OBJECT_SCALE_RANGE
    aspect_range: tuple[float, float] = ASPECT_RANGE
    landscape_prob: float = LANDSCAPE_PROB
    context_backgrounds: tuple[tuple[str, str], ...] = CONTEXT_BACKGROUNDS
    context_prob: float = CONTEXT_PROB
    background_probs: tuple[tuple[str, float], ...] = BACKGROUND_PROBS
    class_textures: tuple[tuple[str, ...], ...] = CLASS_TEXTURES
    border_width: int = BORDER_WIDTH
    min_visible_fraction: float = MIN_VISIBLE_FRACTION
    min_visible_area: float = MIN_VISIBLE_AREA
    min_contrast: float = MIN_CONTRAST
    class_tint_prob: float = CLASS_TINT_PROB
    class_tints: tuple = CLASS_TINTS
    jpeg_quality: int = JPEG_QUALITY

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(self.class_probs) != n or len(self.class_textures) != n or len(self.class_tints) != n:
            raise ConfigError("toy config: class_probs, class_textures and class_tints need one "
                              "entry per class")
        if not 0.0 <= self.class_tint_prob <= 1.0:
            raise ConfigError("toy config: class_tint_prob must lie in [0, 1]")
        for name, probs in (("class_probs", self.class_probs),
                            ("objects_per_image_probs", self.objects_per_image_probs),
                            ("background_probs", [p for _, p in self.background_probs])):
            if abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
                raise ConfigError(f"toy config: {name} must be non-negative and sum to 1")
        for cls, _ in self.context_backgrounds:
            if cls not in self.class_names:
                raise ConfigError(f"toy config: context class {cls!r} is not a class name")
        if self.border_width < 1:
            raise ConfigError("toy config: border_width must be at least 1")

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.class_names) + 1

    def typical_background(self, class_name: str) -> str | None:
        return dict(self.context_backgrounds).get(class_name)


DEFAULT_CONFIG = ToyConfig()


@dataclass
class ToySample:
    """One synthesised image with its ground truth and the facts the tests check."""

    image: np.ndarray            # (H, W, 3) uint8
    mask: np.ndarray             # (H, W) uint8: 0 background, 1..K classes, 255 border band
    instances: np.ndarray        # (H, W) int: 0 background, 1.. kept objects (before the band)
    object_labels: list[int]     # class label (1..K) of each kept object, back to front
    num_planned: int             # objects drawn from objects_per_image_probs
    planned_labels: list[int]    # class label of every planned object, before drops
    background: str              # background texture name
    dropped: int = 0             # objects removed because occlusion left them too small


# --------------------------------------------------------------------------------------------
# Shapes: each is an inside-test on canonical coordinates (u right, v down, extent ~[-1, 1]),
# evaluated on inverse-mapped pixel positions so rotation/scale/flip cost nothing extra.
# --------------------------------------------------------------------------------------------

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points (the loop is over the few polygon edges)."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[:, 0], verts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for xa, ya, xb, yb in zip(x0, y0, x1, y1):
        if ya == yb:
            continue
        crosses = (ya > v) != (yb > v)
        x_at_v = xa + (v - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (u < x_at_v)
    return inside


def _regular_polygon(n: int, radii: np.ndarray, phase: float) -> np.ndarray:
    ang = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radii * np.cos(ang), radii * np.sin(ang)], axis=1)


def _shape_polygon(rng: np.random.Generator) -> Inside:
    n = int(rng.choice([3, 4, 5]))
    radii = rng.uniform(0.85, 1.0, n)
    verts = _regular_polygon(n, radii, -np.pi / 2)
    return lambda u, v: _inside_polygon(u, v, verts)


def _shape_ellipse(rng: np.random.Generator) -> Inside:
    b = rng.uniform(0.45, 0.95)
    return lambda u, v: u * u + (v / b) ** 2 <= 1.0


def _shape_star(rng: np.random.Generator) -> Inside:
    k = int(rng.choice([5, 6, 7]))
    inner = rng.uniform(0.38, 0.52)
    radii = np.tile([1.0, inner], k)
    verts = _regular_polygon(2 * k, radii, -np.pi / 2)
    return lambda u, v: _inside_polygon(u, v, verts)


def _shape_ring(rng: np.random.Generator) -> Inside:
    b = rng.uniform(0.7, 1.0)
    hole = rng.uniform(0.45, 0.65)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        r2 = u * u + (v / b) ** 2
        return (r2 <= 1.0) & (r2 >= hole * hole)
    return inside


@lru_cache(maxsize=1)
def _horse_bitmap() -> np.ndarray:
    """skimage's horse silhouette, cropped and padded to a square (True = horse)."""
    from skimage import data
    horse = ~data.horse()
    rows, cols = np.nonzero(horse)
    horse = horse[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    side = max(horse.shape)
    out = np.zeros((side, side), dtype=bool)
    r0, c0 = (side - horse.shape[0]) // 2, (side - horse.shape[1]) // 2
    out[r0: r0 + horse.shape[0], c0: c0 + horse.shape[1]] = horse
    out.setflags(write=False)
    return out


def _shape_horse(rng: np.random.Generator) -> Inside:
    bitmap = _horse_bitmap()
    side = bitmap.shape[0]

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        col = np.floor((u + 1) * 0.5 * side).astype(np.int64)
        row = np.floor((v + 1) * 0.5 * side).astype(np.int64)
        ok = (col >= 0) & (col < side) & (row >= 0) & (row < side)
        out = np.zeros(u.shape, dtype=bool)
        out[ok] = bitmap[row[ok], col[ok]]
        return out
    return inside


def _shape_cross(rng: np.random.Generator) -> Inside:
    w = rng.uniform(0.22, 0.34)
    arm = rng.uniform(0.85, 1.0)
    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= w)) | ((av <= arm) & (au <= w))
    return inside


def _shape_crescent(rng: np.random.Generator) -> Inside:
    bite = rng.uniform(0.72, 0.88)
    offset = rng.uniform(0.4, 0.6)
    return lambda u, v: (u * u + v * v <= 1.0) & ((u - offset) ** 2 + v * v > bite * bite)


def _shape_boat(rng: np.random.Generator) -> Inside:
    deck, keel = 0.3, rng.uniform(0.62, 0.78)
    stern = rng.uniform(0.55, 0.75)
    hull = np.array([[-1.0, deck], [1.0, deck], [stern, keel], [-stern * 0.9, keel]])
    top = rng.uniform(-1.0, -0.8)
    mainsail = np.array([[0.05, top], [0.05, deck - 0.08], [rng.uniform(0.6, 0.85), deck - 0.08]])
    jib = np.array([[-0.05, top + 0.15], [-0.05, deck - 0.08],
                    [rng.uniform(-0.7, -0.45), deck - 0.08]])
    with_jib = bool(rng.random() < 0.6)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        m = _inside_polygon(u, v, hull) | _inside_polygon(u, v, mainsail)
        m |= (np.abs(u) <= 0.045) & (v >= top) & (v <= deck)
        if with_jib:
            m |= _inside_polygon(u, v, jib)
        return m
    return inside


#: class name -> (shape sampler, max |rotation| in degrees, may be mirrored)
SHAPES: dict[str, tuple[Callable[[np.random.Generator], Inside], float, bool]] = {
    "polygon": (_shape_polygon, 180.0, False),
    "ellipse": (_shape_ellipse, 180.0, False),
    "star": (_shape_star, 180.0, False),
    "ring": (_shape_ring, 180.0, False),
    "horse": (_shape_horse, 20.0, True),     # animals and boats stay roughly upright
    "cross": (_shape_cross, 180.0, False),
    "crescent": (_shape_crescent, 180.0, False),
    "boat": (_shape_boat, 15.0, True),
}

# 2x2 sub-pixel sample offsets: object coverage in quarters gives anti-aliased edges
_SUBPIXEL = np.array([0.25, 0.75])


def _coverage(inside: Inside, h: int, w: int, cx: float, cy: float, radius: float,
              angle: float, mirror: bool) -> np.ndarray:
    """Fraction (0, .25, .5, .75, 1) of each pixel covered by the transformed shape."""
    ys = (np.arange(h)[:, None] + _SUBPIXEL[None, :]).reshape(-1)
    xs = (np.arange(w)[:, None] + _SUBPIXEL[None, :]).reshape(-1)
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / radius
    v = (-s * dx + c * dy) / radius
    if mirror:
        u = -u
    hits = inside(u, v).astype(np.float32)
    return hits.reshape(h, 2, w, 2).mean(axis=(1, 3))


# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------

_PHOTO_LOADERS = {
    "brick": "brick", "gravel": "gravel", "grass": "grass", "coffee": "coffee",
    "astronaut": "astronaut", "hubble": "hubble_deep_field", "rocket": "rocket",
    "chelsea": "chelsea", "camera": "camera", "moon": "moon", "text": "text", "coins": "coins",
}


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from skimage import data
    arr = np.ascontiguousarray(getattr(data, _PHOTO_LOADERS[name])())
    return Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L")


def _crop(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    """A random crop of a bundled photo, resized to (h, w), float32 in [0, 1]."""
    src = _photo(name)
    max_zoom = min(2.5, src.width / w, src.height / h)
    zoom = rng.uniform(min(0.6, max_zoom), max_zoom)
    cw, ch = w * zoom, h * zoom
    x0 = rng.uniform(0, src.width - cw)
    y0 = rng.uniform(0, src.height - ch)
    out = src.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    arr = np.asarray(out, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def _fractal_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 4,
                   base: int = 3) -> np.ndarray:
    """Value noise: random grids upsampled bilinearly, summed over octaves; in [0, 1]."""
    total = np.zeros((h, w), dtype=np.float32)
    for o in range(octaves):
        g = base * 2 ** o
        grid = rng.random((g + 1, g + 1), dtype=np.float32)
        up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        total += np.asarray(up) * 0.55 ** o
    lo, hi = total.min(), total.max()
    return (total - lo) / max(hi - lo, 1e-6)


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.06, 0.2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = 2 * np.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))
    wobble = 2.0 * _fractal_noise(rng, h, w, octaves=2)
    return 0.5 + 0.5 * np.sin(phase + wobble + rng.uniform(0, 2 * np.pi))


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Mostly horizontal ripples in blues/teals, recognisable as one context across images."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    val = np.zeros((h, w), dtype=np.float32)
    for _ in range(3):
        tilt = rng.uniform(-0.25, 0.25)
        freq = rng.uniform(0.12, 0.35)
        val += np.sin(2 * np.pi * freq * (yy + tilt * xx) + 3.0 * _fractal_noise(rng, h, w, 2, 2))
    val = 0.6 * (val / 6 + 0.5) + 0.4 * _fractal_noise(rng, h, w)
    deep = np.array([0.04, 0.16, 0.36]) + rng.uniform(-0.04, 0.04, 3)
    light = np.array([0.45, 0.70, 0.85]) + rng.uniform(-0.08, 0.08, 3)
    return _duotone(val, deep, light)


def _duotone(gray: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    g = gray[..., None]
    return (dark.astype(np.float32) * (1 - g) + light.astype(np.float32) * g).astype(np.float32)


def _random_duotone(rng: np.random.Generator, gray: np.ndarray) -> np.ndarray:
    dark = rng.uniform(0.0, 0.55, 3)
    light = np.clip(dark + rng.uniform(0.25, 0.7, 3), 0, 1)
    if rng.random() < 0.5:
        dark, light = light, dark
    return _duotone(gray, dark, light)


def _jitter_colour(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Channel permutation, per-channel gain, partial desaturation, brightness/contrast."""
    rgb = rgb[..., rng.permutation(3)]
    rgb = rgb * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    grey = rgb.mean(axis=-1, keepdims=True)
    rgb = grey + (rgb - grey) * np.float32(rng.uniform(0.5, 1.3))
    mean = rgb.mean()
    contrast, brightness = np.float32(rng.uniform(0.7, 1.3)), np.float32(rng.uniform(-0.12, 0.12))
    rgb = (rgb - mean) * contrast + mean + brightness
    return np.clip(rgb, 0, 1).astype(np.float32)


def _texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 texture in [0, 1] with random colour jitter."""
    if name == "water":
        return _water(rng, h, w)
    if name == "grass":
        gray = _crop(rng, "grass", h, w)
        dark = np.array([0.08, 0.22, 0.04]) + rng.uniform(-0.04, 0.04, 3)
        light = np.array([0.50, 0.75, 0.25]) + rng.uniform(-0.1, 0.1, 3)
        return _duotone(gray, dark, light)
    if name == "noise":
        return _random_duotone(rng, _fractal_noise(rng, h, w))
    if name == "stripes":
        return _random_duotone(rng, _stripes(rng, h, w))
    arr = _crop(rng, name, h, w)
    if arr.ndim == 2:
        return _random_duotone(rng, arr)
    return _jitter_colour(rng, arr)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------

def image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index)."""
    return np.random.default_rng([int(seed), int(split), int(index)])


def _image_shape(rng: np.random.Generator, image_size: int, cfg: ToyConfig) -> tuple[int, int]:
    short = int(round(image_size * rng.uniform(*cfg.aspect_range)))
    return (short, image_size) if rng.random() < cfg.landscape_prob else (image_size, short)


def plan_scene(rng: np.random.Generator, cfg: ToyConfig = DEFAULT_CONFIG) -> tuple[list[int], str]:
    """The object classes (0-based, back to front) and the background texture of one image.

    The first contextual class among the objects claims its typical background with
    probability `context_prob`; otherwise the background comes from `background_probs`.
    """
    n = 1 + int(rng.choice(len(cfg.objects_per_image_probs), p=cfg.objects_per_image_probs))
    class_idx = [int(c) for c in rng.choice(len(cfg.class_names), size=n, p=cfg.class_probs)]
    return class_idx, _choose_background(rng, class_idx, cfg)


def _choose_background(rng: np.random.Generator, class_idx: list[int], cfg: ToyConfig) -> str:
    contextual = [cfg.typical_background(cfg.class_names[c]) for c in class_idx]
    contextual = [b for b in contextual if b is not None]
    use_context = rng.random() < cfg.context_prob
    if contextual and use_context:
        return contextual[0]
    names = [n for n, _ in cfg.background_probs]
    probs = np.array([p for _, p in cfg.background_probs])
    return names[int(rng.choice(len(names), p=probs / probs.sum()))]


def _push_contrast(rng: np.random.Generator, tex: np.ndarray, bg: np.ndarray,
                   weight: np.ndarray, min_dist: float) -> np.ndarray:
    """Shift the object's colours away from the background's under it if they are too close."""
    # Drawn first so the random stream does not depend on which branch is taken.
    fallback = rng.normal(size=3)
    wsum = weight.sum()
    if wsum <= 0:
        return tex
    mean_obj = (tex * weight[..., None]).sum(axis=(0, 1)) / wsum
    mean_bg = (bg * weight[..., None]).sum(axis=(0, 1)) / wsum
    diff = mean_obj - mean_bg
    dist = float(np.linalg.norm(diff))
    if dist >= min_dist:
        return tex
    direction = diff / dist if dist > 1e-6 else fallback / np.linalg.norm(fallback)
    direction = direction.astype(np.float32)
    pushed = np.clip(tex + direction * (min_dist - dist), 0, 1)
    pushed_mean = (pushed * weight[..., None]).sum(axis=(0, 1)) / wsum
    if np.linalg.norm(pushed_mean - mean_bg) >= 0.9 * min_dist:
        return pushed.astype(np.float32)
    # Clipping ate the shift (object near the colour cube's edge): go the other way instead.
    return np.clip(tex - direction * (min_dist + dist), 0, 1).astype(np.float32)


def synthesize(rng: np.random.Generator, image_size: int,
               cfg: ToyConfig = DEFAULT_CONFIG) -> ToySample:
    """Draw one image and its VOC-style mask from `rng`."""
    h, w = _image_shape(rng, image_size, cfg)
    class_idx, background = plan_scene(rng, cfg)
    n_planned = len(class_idx)
    bg = _texture(rng, background, h, w)

    long_side = max(h, w)
    coverages: list[np.ndarray] = []
    textures: list[np.ndarray] = []
    for c in class_idx:
        name = cfg.class_names[c]
        sampler, max_rot, may_mirror = SHAPES[name]
        inside = sampler(rng)
        radius = 0.5 * long_side * rng.uniform(*cfg.object_scale_range)
        angle = math.radians(rng.uniform(-max_rot, max_rot))
        mirror = bool(may_mirror and rng.random() < 0.5)
        # Centres keep most of the object inside the frame (a little truncation, as in VOC).
        margin_x = min(0.6 * radius, w / 2)
        margin_y = min(0.6 * radius, h / 2)
        cx = rng.uniform(margin_x, w - margin_x)
        cy = rng.uniform(margin_y, h - margin_y)
        coverages.append(_coverage(inside, h, w, cx, cy, radius, angle, mirror))
        pool = [t for t in cfg.class_textures[c] if t != background]
        tex = _texture(rng, pool[int(rng.integers(len(pool)))], h, w)
        if rng.random() < cfg.class_tint_prob:
            dark, light = (np.asarray(t, dtype=np.float32) for t in cfg.class_tints[c])
            shift = rng.uniform(-0.06, 0.06, 3).astype(np.float32)
            tex = np.clip(_duotone(tex.mean(axis=-1), dark + shift, light + shift), 0, 1)
        textures.append(_push_contrast(rng, tex, bg, coverages[-1], cfg.min_contrast))

    # Later objects occlude earlier ones; drop objects left too small, then re-layer.
    kept = list(range(n_planned))
    min_area = cfg.min_visible_area * h * w
    for _ in range(n_planned):
        instances = _layer(coverages, kept, h, w)
        too_small = [
            k for j, k in enumerate(kept[:-1])   # the front object is never occluded
            if (vis := int((instances == j + 1).sum())) < min_area
            or vis < cfg.min_visible_fraction * int((coverages[k] >= 0.5).sum())
        ]
        if not too_small:
            break
        kept = [k for k in kept if k != too_small[0]]
    instances = _layer(coverages, kept, h, w)

    img = bg.copy()
    for k in kept:
        alpha = coverages[k][..., None]
        img = img * (1 - alpha) + textures[k] * alpha
    # Illumination gradient and sensor noise so flat colour statistics are not a shortcut.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta)
    img = img * (1 + rng.uniform(0, 0.35) * ramp)[..., None]
    img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    img8 = np.asarray(Image.fromarray(img8, mode="RGB").filter(ImageFilter.GaussianBlur(0.5)))

    labels_of_instance = np.array([0] + [class_idx[k] + 1 for k in kept], dtype=np.uint8)
    mask = labels_of_instance[instances]
    mask[border_band(instances, cfg.border_width)] = IGNORE
    return ToySample(image=img8, mask=mask, instances=instances,
                     object_labels=[class_idx[k] + 1 for k in kept], num_planned=n_planned,
                     planned_labels=[c + 1 for c in class_idx],
                     background=background, dropped=n_planned - len(kept))


def _layer(coverages: list[np.ndarray], kept: list[int], h: int, w: int) -> np.ndarray:
    """Instance map: 0 background, j+1 where kept[j] is the front-most object covering >= 1/2."""
    instances = np.zeros((h, w), dtype=np.int32)
    for j, k in enumerate(kept):
        instances[coverages[k] >= 0.5] = j + 1
    return instances


def border_band(instances: np.ndarray, half_width: int) -> np.ndarray:
    """Pixels within `half_width` of a change of instance id (both sides), like VOC's band."""
    band = find_boundaries(instances, connectivity=1, mode="thick")
    if half_width > 1:
        band = ndimage.binary_dilation(band, structure=np.ones((3, 3), bool),
                                       iterations=half_width - 1)
    return band


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------

def toy_ids(num_train_aug: int, num_val: int) -> tuple[list[str], list[str]]:
    return ([f"train_{i:06d}" for i in range(num_train_aug)],
            [f"val_{i:06d}" for i in range(num_val)])


def _check_args(seed: int, image_size: int, num_train_aug: int, num_train_eval: int,
                num_val: int) -> None:
    for key, value, lo in (("seed", seed, 0), ("image_size", image_size, 32),
                           ("num_train_aug", num_train_aug, 1),
                           ("num_train_eval", num_train_eval, 1),
                           ("num_val", num_val, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(f"toy dataset: {key} must be an integer >= {lo}, got {value!r}")
    if num_train_eval > num_train_aug:
        raise ConfigError(f"toy dataset: num_train_eval ({num_train_eval}) must not exceed "
                          f"num_train_aug ({num_train_aug}); train is a subset of train_aug")


def generate_toy(out_dir: str | os.PathLike, *, seed: int, image_size: int, num_train_aug: int,
                 num_train_eval: int, num_val: int, config: ToyConfig = DEFAULT_CONFIG) -> None:
    """Write the toy dataset in VOC layout to `out_dir` (replaced atomically when complete)."""
    _check_args(seed, image_size, num_train_aug, num_train_eval, num_val)
    train_ids, val_ids = toy_ids(num_train_aug, num_val)
    with atomic_dir(out_dir) as tmp:
        img_dir, mask_dir = tmp / "JPEGImages", tmp / "SegmentationClassAug"
        list_dir = tmp / "ImageSets" / "Segmentation"
        for d in (img_dir, mask_dir, list_dir):
            d.mkdir(parents=True)
        for split, ids in ((SPLIT_TRAIN_AUG, train_ids), (SPLIT_VAL, val_ids)):
            for index, image_id in enumerate(ids):
                sample = synthesize(image_rng(seed, split, index), image_size, config)
                Image.fromarray(sample.image, mode="RGB").save(
                    img_dir / f"{image_id}.jpg", format="JPEG", quality=config.jpeg_quality)
                label_image(sample.mask).save(mask_dir / f"{image_id}.png", format="PNG")
        _write_lines(list_dir / "train_aug.txt", train_ids)
        _write_lines(list_dir / "train.txt", train_ids[:num_train_eval])
        _write_lines(list_dir / "val.txt", val_ids)
        _write_lines(tmp / "class_names.txt", ["background", *config.class_names])


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))
