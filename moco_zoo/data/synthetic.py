"""Procedural "objects in scenes" generator: textured shapes on textured backgrounds, with exact instance masks.

Every object class is a *shape* (circle, star, ring, ...). As in natural images, where a category is more than its
outline (zebras are striped, boats sit on water), each class also has a characteristic surface texture and, for the
one-object classification images, a characteristic scene context (background kind): each is used with probability
:data:`APPEARANCE_PRIOR`, otherwise drawn at random. Colour, scale, rotation and aspect are drawn independently of the
class (colour alone is near chance, a test checks it). Backgrounds are procedural (smooth colour noise, gradients,
stripes) with clutter of short line strokes that never form a closed shape.

Occlusion is exact: objects are painted in order into an ``instance_map`` (later objects overwrite earlier ones), so
each instance's mask is exactly the set of pixels that show it, and its box is the tight box of that mask.

Determinism: one scene is a pure function of ``(seed, stream, index)`` through :func:`scene_rng`; nothing depends
on the number of images generated, the wall clock or the platform's hash seed.
"""
from __future__ import annotations

import colorsys
import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generator's output changes, so cached datasets (ensure_dataset) are regenerated.
GENERATOR_VERSION = 2  # 2: class-conditional texture and context (APPEARANCE_PRIOR)

CLASSES: Tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "heart",
    "arrow",
)

# COCO-style supercategory of each class.
SUPERCATEGORIES: Dict[str, str] = {
    "circle": "curved",
    "ring": "curved",
    "crescent": "curved",
    "heart": "curved",
    "square": "polygon",
    "triangle": "polygon",
    "hexagon": "polygon",
    "star": "polygon",
    "cross": "polygon",
    "arrow": "polygon",
}

TEXTURES: Tuple[str, ...] = ("solid", "striped", "checker", "noise")
BACKGROUNDS: Tuple[str, ...] = ("noise", "gradient", "stripes")

# Probability that an object wears its class's texture (and a classification image shows its class's context);
# without such correlations instance discrimination learns nothing about the class: texture and background are the
# cues that survive MoCo's colour augmentation, and with them independent of the class only the outline is left.
APPEARANCE_PRIOR = 0.6
# A distinct (texture, background) pair per class.
CLASS_TEXTURE: Tuple[str, ...] = tuple(TEXTURES[i % len(TEXTURES)] for i in range(len(CLASSES)))
CLASS_BACKGROUND: Tuple[str, ...] = tuple(BACKGROUNDS[(i // len(TEXTURES) + i) % len(BACKGROUNDS)]
                                          for i in range(len(CLASSES)))

# A shape is a list of (polygon in unit coordinates, additive?) operations: additive polygons are filled, the
# others are cut out afterwards (ring hole, crescent bite). Unit shapes fit in the disc of radius 1.
ShapeOps = List[Tuple[np.ndarray, bool]]


def _ngon(n: int, radius: float = 1.0, phase: float = 0.0, center: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
        dtype=np.float64,
    )


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _arrow() -> np.ndarray:
    return np.array(
        [[-1.0, -0.22], [0.15, -0.22], [0.15, -0.62], [1.0, 0.0], [0.15, 0.62], [0.15, 0.22], [-1.0, 0.22]]
    )


_CIRCLE = _ngon(48)
_UNIT_SHAPES: Dict[str, ShapeOps] = {
    "circle": [(_CIRCLE, True)],
    "square": [(_ngon(4, 1.0, np.pi / 4), True)],
    "triangle": [(_ngon(3, 1.0, -np.pi / 2, (0.0, 0.15)), True)],
    "star": [(_star(), True)],
    "cross": [(_cross(), True)],
    "ring": [(_CIRCLE, True), (_ngon(48, 0.55), False)],
    "hexagon": [(_ngon(6), True)],
    "crescent": [(_CIRCLE, True), (_ngon(48, 0.85, 0.0, (0.5, -0.1)), False)],
    "heart": [(_heart(), True)],
    "arrow": [(_arrow(), True)],
}
assert set(_UNIT_SHAPES) == set(CLASSES)


@dataclass
class Instance:
    """One annotated object (or crowd region) of a scene; pixel coordinates are 0-based, boxes inclusive."""

    category: int  # index into CLASSES
    mask: np.ndarray  # HxW bool: the visible pixels of this object
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive) tight box of ``mask``
    area: int  # number of visible pixels
    truncated: bool  # the object is cut by the image border
    difficult: bool  # very small or heavily occluded
    iscrowd: bool = False  # a group of small same-class objects annotated as one region
    visible_fraction: float = 1.0  # visible pixels / pixels of the whole shape (occlusion and truncation)

    @property
    def name(self) -> str:
        return CLASSES[self.category]


@dataclass
class Scene:
    """A rendered image with its annotations.

    ``instance_map`` holds ``i + 1`` at the pixels of ``instances[i]``, 0 for background and 255 for pixels of
    objects that were drawn but are too small or too hidden to annotate (VOC "void").
    """

    image: np.ndarray  # HxWx3 uint8
    instance_map: np.ndarray  # HxW uint8
    instances: List[Instance] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """Independent generator for image ``index`` of ``stream`` (e.g. "imagefolder/train"), given ``seed``."""
    digest = hashlib.sha256(stream.encode("utf-8")).digest()
    key = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *key, int(index)])))


# ----------------------------------------------------------------------------------------------------------- colour


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random RGB colours (float, 0..255), uniform hue, varied saturation and value."""
    hsv = np.stack([rng.random(n), rng.uniform(0.25, 1.0, n), rng.uniform(0.3, 1.0, n)], axis=1)
    return np.array([colorsys.hsv_to_rgb(*c) for c in hsv.tolist()], dtype=np.float64).reshape(n, 3) * 255.0


def _contrasting_colours(rng: np.random.Generator, n: int, against: np.ndarray) -> np.ndarray:
    """``n`` random colours, each the farthest from ``against`` out of three candidates (keeps objects visible)."""
    cand = _random_colours(rng, 3 * n).reshape(n, 3, 3)
    dist = np.abs(cand - against[None, None, :]).sum(-1)
    return cand[np.arange(n), dist.argmax(1)]


# -------------------------------------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3) -> np.ndarray:
    """HxWxC float noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    ch, cw = max(2, cells), max(2, int(round(cells * w / max(h, 1))))
    grid = (rng.random((ch, cw, channels)) * 255).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(grid if channels == 3 else grid[..., 0], mode).resize((w, h), Image.BILINEAR)
    out = np.asarray(img, dtype=np.float32) / 255.0
    return out if channels == 3 else out[..., None]


def _stripes(rng: np.random.Generator, h: int, w: int, period: float, ox: float = 0.0, oy: float = 0.0) -> np.ndarray:
    """HxW float in {0, 1}: straight stripes of a random angle and the given period (pixels)."""
    theta = rng.uniform(0, np.pi)
    phase = rng.uniform(0, period)
    ys, xs = np.ogrid[0:h, 0:w]
    proj = (xs + ox) * np.cos(theta) + (ys + oy) * np.sin(theta) + phase
    return ((proj // (period / 2)) % 2).astype(np.float32)


def _texture(rng: np.random.Generator, kind: str, h: int, w: int, colours: np.ndarray, scale: float) -> np.ndarray:
    """HxWx3 float fill of one object: ``colours`` is 2x3 (primary, secondary)."""
    c0, c1 = colours[0].astype(np.float32), colours[1].astype(np.float32)
    if kind == "solid":
        shade = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
        return np.clip(np.broadcast_to(c0, (h, w, 3)) * shade, 0, 255)
    if kind == "striped":
        t = _stripes(rng, h, w, period=max(3.0, scale * rng.uniform(0.25, 0.6)))[..., None]
        return c0 * (1 - t) + c1 * t
    if kind == "checker":
        cell = max(2, int(round(scale * rng.uniform(0.15, 0.35))))
        ys, xs = np.ogrid[0:h, 0:w]
        t = (((ys // cell) + (xs // cell)) % 2).astype(np.float32)[..., None]
        return c0 * (1 - t) + c1 * t
    # noise: the primary colour modulated by smooth noise toward the secondary one
    t = _smooth_noise(rng, h, w, cells=int(rng.integers(3, 7)), channels=1)
    return c0 * (1 - t) + c1 * t


def _pick(rng: np.random.Generator, choices: Tuple[str, ...], preferred: Optional[str]) -> str:
    """``preferred`` with probability APPEARANCE_PRIOR (when given), else a uniform draw from ``choices``."""
    if preferred is not None and rng.random() < APPEARANCE_PRIOR:
        return preferred
    return choices[int(rng.integers(len(choices)))]


def _background(rng: np.random.Generator, h: int, w: int, category: Optional[int] = None) -> np.ndarray:
    """HxWx3 float background: noise, gradient or stripes (``category``'s context more often, when given)."""
    kind = _pick(rng, BACKGROUNDS, CLASS_BACKGROUND[category] if category is not None else None)
    colours = _random_colours(rng, 2).astype(np.float32)
    if kind == "noise":
        t = _smooth_noise(rng, h, w, cells=int(rng.integers(3, 9)))
        base = 0.5 * (colours[0] * (1 - t) + colours[1] * t) + 0.5 * t * 255
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        ys, xs = np.ogrid[0:h, 0:w]
        p = xs * np.cos(theta) / w + ys * np.sin(theta) / h
        p = ((p - p.min()) / max(float(p.max() - p.min()), 1e-6)).astype(np.float32)[..., None]
        base = colours[0] * (1 - p) + colours[1] * p
    else:
        t = _stripes(rng, h, w, period=rng.uniform(0.04, 0.2) * min(h, w))[..., None]
        soft = rng.uniform(0.3, 0.8)  # low-contrast stripes, so they do not dominate the objects
        base = colours[0] * (1 - soft * t) + colours[1] * soft * t
    return base


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """Short open strokes (lines and zig-zags) of random colours: clutter that never closes into a shape."""
    n = int(rng.integers(3, 12))
    size = min(h, w)
    colours = _random_colours(rng, n).astype(np.int64)
    for i in range(n):
        k = int(rng.integers(2, 4))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        steps = rng.normal(0, size * 0.08, (k - 1, 2))
        pts = np.cumsum(np.vstack([[x0, y0], steps]), axis=0)
        draw.line([tuple(p) for p in pts.tolist()], fill=tuple(colours[i].tolist()), width=int(rng.integers(1, 3)))


# ---------------------------------------------------------------------------------------------------------- objects


@dataclass
class _Placed:
    category: int
    full_area: int  # pixels of the whole shape, including the parts outside the image
    truncated: bool
    crowd: bool = False


def _shape_mask(
    category: int, cx: float, cy: float, radius: float, aspect: float, angle: float
) -> Tuple[np.ndarray, int, int]:
    """Rasterise one transformed shape; return (bool mask of its bounding crop, x offset, y offset)."""
    c, s = np.cos(angle), np.sin(angle)
    sx, sy = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    rot = np.array([[c * sx, s * sx], [-s * sy, c * sy]])  # scale then rotate: p' = p @ diag(sx, sy) @ R
    ops = [(poly @ rot + (cx, cy), add) for poly, add in _UNIT_SHAPES[CLASSES[category]]]
    allpts = np.vstack([p for p, add in ops if add])
    x0, y0 = int(np.floor(allpts[:, 0].min())) - 1, int(np.floor(allpts[:, 1].min())) - 1
    x1, y1 = int(np.ceil(allpts[:, 0].max())) + 2, int(np.ceil(allpts[:, 1].max())) + 2
    crop = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(crop)
    for poly, add in ops:
        draw.polygon([tuple(p) for p in (poly - (x0, y0)).tolist()], fill=1 if add else 0)
    return np.asarray(crop, dtype=bool), x0, y0


def _paint(
    image: np.ndarray,
    inst_map: np.ndarray,
    label: int,
    mask: np.ndarray,
    x0: int,
    y0: int,
    rng: np.random.Generator,
    radius: float,
    background_mean: np.ndarray,
    category: int,
) -> Tuple[int, bool]:
    """Paint a shape mask (crop at x0, y0) with a texture (its class's one more often); return (full area,
    truncated?)."""
    h, w = inst_map.shape
    full_area = int(mask.sum())
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + mask.shape[1], w), min(y0 + mask.shape[0], h)
    if ix1 <= ix0 or iy1 <= iy0:
        return full_area, True
    sub = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    truncated = int(sub.sum()) < full_area
    kind = _pick(rng, TEXTURES, CLASS_TEXTURE[category])
    colours = _contrasting_colours(rng, 2, background_mean)
    fill = _texture(rng, kind, iy1 - iy0, ix1 - ix0, colours, scale=radius)
    region = image[iy0:iy1, ix0:ix1]
    region[sub] = fill[sub]
    inst_map[iy0:iy1, ix0:ix1][sub] = label
    return full_area, truncated


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    num_objects: Tuple[int, int] = (1, 5),
    dominant: Optional[int] = None,
    crowd_prob: float = 0.0,
    min_area: Optional[int] = None,
) -> Scene:
    """Render one scene.

    Args:
        rng: the scene's generator (see :func:`scene_rng`).
        width, height: image size in pixels.
        num_objects: inclusive range of the number of objects (ignored when ``dominant`` is set).
        dominant: if given, a single large object of this class is drawn last near the centre, over 0-2 small
            distractors of other classes (ImageFolder-style classification images).
        crowd_prob: probability of adding one crowd region (a cluster of 5-10 tiny objects of one class, annotated
            as one ``iscrowd`` instance) behind the other objects.
        min_area: objects with fewer visible pixels are not annotated (their pixels become void, 255).
    """
    size = min(width, height)
    bg = _background(rng, height, width, dominant)
    grain = rng.integers(-5, 6, (height, width, 1), dtype=np.int8).astype(np.float32)  # sensor-like pixel noise
    pil = Image.fromarray(np.clip(bg + grain, 0, 255).astype(np.uint8), "RGB")
    _clutter(ImageDraw.Draw(pil), rng, height, width)
    image = np.array(pil, dtype=np.float32)
    bg_mean = bg.reshape(-1, 3).mean(0)
    inst_map = np.zeros((height, width), dtype=np.uint8)
    placed: List[_Placed] = []
    n_classes = len(CLASSES)

    def place(category: int, cx: float, cy: float, radius: float, crowd: bool = False, label: int = 0) -> int:
        aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.0 / 0.7))))
        angle = rng.uniform(0, 2 * np.pi)
        mask, x0, y0 = _shape_mask(category, cx, cy, radius, aspect, angle)
        if label == 0:
            placed.append(_Placed(category, 0, False, crowd))
            label = len(placed)
        area, trunc = _paint(image, inst_map, label, mask, x0, y0, rng, radius, bg_mean, category)
        p = placed[label - 1]
        p.full_area += area
        p.truncated = p.truncated or trunc
        return label

    if crowd_prob > 0 and rng.random() < crowd_prob:
        cat = int(rng.integers(n_classes))
        ccx, ccy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        label = 0
        for _ in range(int(rng.integers(5, 11))):
            ox, oy = rng.normal(0, 0.09 * size, 2)
            label = place(cat, ccx + ox, ccy + oy, rng.uniform(0.03, 0.05) * size, crowd=True, label=label)

    if dominant is not None:
        for _ in range(int(rng.integers(0, 3))):
            other = int((dominant + rng.integers(1, n_classes)) % n_classes)
            place(other, rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height, rng.uniform(0.06, 0.1) * size)
        cx = width / 2 + rng.uniform(-0.12, 0.12) * width
        cy = height / 2 + rng.uniform(-0.12, 0.12) * height
        place(dominant, cx, cy, rng.uniform(0.24, 0.4) * size)
    else:
        for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
            radius = size * float(np.exp(rng.uniform(np.log(0.06), np.log(0.3))))
            place(int(rng.integers(n_classes)), rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height, radius)

    min_area = max(12, int(0.0015 * width * height)) if min_area is None else min_area
    difficult_area = 0.01 * width * height
    instances: List[Instance] = []
    final_map = np.zeros_like(inst_map)
    for label, p in enumerate(placed, start=1):
        mask = inst_map == label
        area = int(mask.sum())
        if area == 0:
            continue
        visible = area / max(p.full_area, 1)
        if area < min_area or visible < 0.2:
            final_map[mask] = 255
            continue
        ys = np.flatnonzero(mask.any(1))
        xs = np.flatnonzero(mask.any(0))
        box = (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))
        difficult = (not p.crowd) and (area < difficult_area or visible < 0.5)
        instances.append(Instance(p.category, mask, box, area, p.truncated, difficult, p.crowd, visible))
        final_map[mask] = len(instances)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), final_map, instances)


def voc_palette() -> List[int]:
    """The 256-entry PASCAL VOC colour map (flat RGB list), built with the usual bit-interleaving rule."""
    pal: List[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal
