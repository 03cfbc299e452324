"""Prompt adherence for the shapes dataset (fluxrt.shapes), measured from pixels alone: no learned weights, so the
evaluator shares nothing with the generator it grades.

    colour, shape = measure(pixels, scene)      # what an image generated for a one-object scene shows
    shows_background(pixels, scene)             # whether each half shows the background the scene names
    adherence(images, scenes)                   # {"colour": 0.95, "shape": 0.8, "both": 0.78, "background": 0.9,
                                                #  "all": 0.7, "n": 64}
    scenes = heldout_scenes(64, seed=0)         # the shared evaluation prompts (combinations never trained on)

How an image is read:
1. Object pixels are those far in RGB from the background each half of the image shows: the half's median colour,
   if that is one of the dataset's backgrounds with a colour cast, preferably the one the scene names (a model that
   swaps a two-tone background's halves, or draws another background, has its object graded all the same, and
   fails `shows_background`, a separate score); an unknown background is graded against the name, so it reads as
   no object. Within a few rows of a two-tone seam (which blurs in generated images), any mix of the two halves'
   colours is background too.
2. The object is the largest 4-connected blob of them (a generated image may have specks). A blob too small or far
   too big to be any object the dataset draws, or one no more colourful than the background, means no object:
   (None, None).
3. Colour: the COLOURS entry nearest to the blob's inner pixels, each taken as a mix of an object colour and its
   expected background (a small or blurred object's core is still part background), median over the pixels.
4. Shape: by rotational symmetry. Each pixel is weighted by how much of it the object covers (read from its chroma:
   the backgrounds are all gray), over the object's connected core; the normalised complex
   moment |sum w z^k| / sum w |z|^k (z: the pixel's offset from the centroid) is 0 for a shape without k-fold
   symmetry and large for a k-fold one. The dataset's shapes are a triangle (k=3), a square (4), a five-point star
   (5), and a circle, which has no dominant order (every k is ~0). Blur and noise shrink these strengths but keep the
   order, which is why this beats area ratios (fill, solidity) that blur turns ambiguous on small shapes.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from fluxrt.shapes import BACKGROUNDS, COLOURS, SIZE, SIZES, Scene, sample_scenes

OBJECT_DISTANCE = 40.0  # RGB; every object colour is >= 86 from every background colour; noise of std 8 gives ~14
# RGB; a half this close to a background colour shows that background with a colour cast (up to ~35 per channel);
# further off it is another colour: the nearest object colour to a background is purple, 86 from gray, and the
# backgrounds are >= 187 apart
CAST_LIMIT = 60.0
SEAM_ROWS = 3  # rows either side of a two-tone seam where mixes of its two colours count as background
MIN_CHROMA = 30.0  # RGB; the object colour's distance from neutral gray: every COLOURS entry has >= 86
MIN_AREA = 20  # pixels; the smallest object the dataset draws (a small star) covers ~80
SUPPORT_COVERAGE = 0.25  # pixels at least this much covered, and connected, make up the object's shape
MAX_AREA = 4 * np.pi * max(SIZES.values()) ** 2  # pixels; four times the largest object (a large circle)
# Symmetry strength above which an order counts. Measured on a third of all colour x shape x position x size x
# background renders: clean, circles <= 0.011 and the other shapes' own order >= 0.39; blurred (sigma 1.4), noisy
# (std 12) and colour-cast (20 per channel), circles <= 0.10 and the others >= 0.20.
SYMMETRY_MIN = 0.15
SHAPE_OF_ORDER = {3: "triangle", 4: "square", 5: "star"}
_HALVES = (slice(0, SIZE // 2), slice(SIZE // 2, SIZE))  # rows of the top and bottom background
_COLOUR_NAMES = list(COLOURS)
_COLOUR_TABLE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float64)  # [6, 3]
_BACKGROUND_TABLE = np.array(list(BACKGROUNDS.values()), dtype=np.float64)  # [3, 3]


def measure(pixels, scene: Scene) -> tuple[str | None, str | None]:
    """(colour, shape) that `pixels` (uint8 [SIZE, SIZE, 3]), generated for `scene`, shows; (None, None) if none."""
    image = _check_image(pixels)
    (top, top_ref), (bottom, bottom_ref) = _backgrounds(image, scene)
    background = _per_half(top, bottom)
    distance = _background_distance(image, background, top, bottom)
    blob = _largest_blob(distance > OBJECT_DISTANCE)
    if not MIN_AREA <= blob.sum() <= MAX_AREA:
        return None, None
    inner = blob & (distance >= 0.75 * np.percentile(distance[blob], 90))
    chroma = image - image.mean(axis=-1, keepdims=True)
    tint = np.median(chroma[~blob], axis=0)  # the background's chroma: zero but for a colour cast
    hue = np.median(chroma[inner], axis=0) - tint  # the object's chroma over the background's
    if np.linalg.norm(hue) < MIN_CHROMA:  # gray (or the background's tint): no colour the dataset draws
        return None, None
    cast = (background - _per_half(top_ref, bottom_ref))[inner]
    return _nearest_colour(image[inner], background[inner], cast), _read_shape(chroma - tint, hue)


def shows_background(pixels, scene: Scene) -> bool:
    """Whether each half of `pixels` shows the background `scene` names (up to a colour cast): for a two-tone one, the
    first named colour on top."""
    image = _check_image(pixels)
    return all(_shows(image[rows].reshape(-1, 3), named) for rows, named in zip(_HALVES, _named_backgrounds(scene)))


def _shows(pixels: np.ndarray, named: np.ndarray) -> bool:
    """Whether pixels [N, 3] are mostly one colour, `named` up to a colour cast: their median is near it, and most of
    them are near the median (noise has a gray median too)."""
    seen = np.median(pixels, axis=0)
    plain = np.mean(np.linalg.norm(pixels - seen, axis=-1) <= OBJECT_DISTANCE) >= 0.5
    return plain and np.linalg.norm(seen - named) <= CAST_LIMIT


def adherence(images, scenes) -> dict:
    """Fractions of `images` whose measured object colour, shape, both, background (shows_background), and all three
    match their one-object `scenes`."""
    images, scenes = list(images), list(scenes)
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one image per scene")
    if not scenes:
        raise ValueError("adherence of no images is undefined; pass at least one image and its scene")
    hits = {"colour": 0, "shape": 0, "both": 0, "background": 0, "all": 0}
    for pixels, scene in zip(images, scenes):
        asked = _single_object(scene)
        colour, shape = measure(pixels, scene)
        background = shows_background(pixels, scene)
        both = colour == asked.colour and shape == asked.shape
        for key, hit in (("colour", colour == asked.colour), ("shape", shape == asked.shape), ("both", both),
                         ("background", background), ("all", both and background)):
            hits[key] += hit
    n = len(scenes)
    return {**{key: count / n for key, count in hits.items()}, "n": n}


def heldout_scenes(count: int, seed: int = 0) -> list[Scene]:
    """The evaluation prompts: `count` held-out scenes, the same for the same seed."""
    return sample_scenes(np.random.default_rng(seed), count, "heldout")


def _check_image(pixels) -> np.ndarray:
    image = np.asarray(pixels)
    if image.shape != (SIZE, SIZE, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image of shape ({SIZE}, {SIZE}, 3), got {image.dtype} "
                         f"{image.shape}; convert a PIL image with np.asarray(image.convert('RGB'))")
    return image.astype(np.float64)


def _single_object(scene: Scene):
    if len(scene.objects) != 1:
        raise ValueError(f"adherence grades one-object scenes (the held-out prompts), got {len(scene.objects)} "
                         "objects; use heldout_scenes()")
    return scene.objects[0]


def _named_backgrounds(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """RGB of the top and bottom halves' background as the scene names them (the same twice for a plain one)."""
    unknown = [name for name in scene.background if name not in BACKGROUNDS]
    if unknown or len(scene.background) not in (1, 2):
        raise ValueError(f"scene background must be one or two of {list(BACKGROUNDS)}, got {scene.background}")
    return tuple(np.array(BACKGROUNDS[name], dtype=np.float64) for name in (scene.background[0], scene.background[-1]))


def _backgrounds(image: np.ndarray, scene: Scene) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((seen, reference), (seen, reference)) for the top and bottom halves (see _seen_background)."""
    return tuple(_seen_background(image[rows], named) for rows, named in zip(_HALVES, _named_backgrounds(scene)))


def _seen_background(half: np.ndarray, named: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the background colour one half [rows, SIZE, 3] of the image shows, the dataset colour it is a cast of): its
    median (an object covers well under half of it) where that is `named`, or else another of the dataset's
    backgrounds, with a colour cast; else (`named`, `named`): an unknown background is graded against the name, so
    all of it reads as one blob too big to be an object."""
    seen = np.median(half.reshape(-1, 3), axis=0)
    for reference in (named, *_BACKGROUND_TABLE):
        if np.linalg.norm(seen - reference) <= CAST_LIMIT:
            return seen, reference
    return named, named


def _per_half(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """[SIZE, SIZE, 3]: `top` in the top half's rows, `bottom` in the bottom half's."""
    return np.broadcast_to(np.where((np.arange(SIZE) < SIZE // 2)[:, None, None], top, bottom), (SIZE, SIZE, 3))


def _background_distance(image: np.ndarray, expected: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """[SIZE, SIZE] RGB distance of each pixel from its `expected` background; near the seam, from any top/bottom mix."""
    distance = np.linalg.norm(image - expected, axis=-1)
    seam = slice(SIZE // 2 - SEAM_ROWS, SIZE // 2 + SEAM_ROWS)
    distance[seam] = _distance_from_lines(image[seam], top, bottom)
    return distance


def _distance_from_lines(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """RGB distance of `points` [..., 3] from the nearest mix of `starts` [..., 3] and `ends` [..., 3] (broadcast)."""
    direction = ends - starts
    length_sq = np.maximum((direction * direction).sum(-1), 1e-9)  # a zero-length line is its one colour
    share = np.clip(((points - starts) * direction).sum(-1) / length_sq, 0, 1)
    return np.linalg.norm(points - (starts + share[..., None] * direction), axis=-1)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask` (breadth-first over its pixels only; empty if `mask` is)."""
    unseen = set(zip(*np.nonzero(mask)))
    best: list[tuple[int, int]] = []
    while unseen:
        start = unseen.pop()
        component, queue = [start], deque([start])
        while queue:
            y, x = queue.popleft()
            for neighbour in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if neighbour in unseen:
                    unseen.remove(neighbour)
                    component.append(neighbour)
                    queue.append(neighbour)
        if len(component) > len(best):
            best = component
    blob = np.zeros_like(mask)
    if best:
        blob[tuple(np.array(best).T)] = True
    return blob


def _read_shape(chroma: np.ndarray, hue: np.ndarray) -> str:
    """The shape of the object of chroma `hue` in an image of `chroma` [SIZE, SIZE, 3] (both over the background's).
    Every background, and every mix of two as on a blurred seam, is a neutral gray, so a pixel's chroma is `hue`
    times the fraction of it the object covers; noise is as often negative as positive, so it averages out."""
    coverage = chroma @ hue / float(hue @ hue)
    support = _largest_blob(coverage >= SUPPORT_COVERAGE)  # noise specks touching the object would sway the moments
    return _classify_shape(np.where(support, np.clip(coverage, 0, 1), 0))


def _nearest_colour(core: np.ndarray, background: np.ndarray, cast: np.ndarray) -> str:
    """The COLOURS entry (tinted by the image's colour `cast`) whose mixes with each core pixel's `background` pass
    closest to the core pixels [N, 3], median over them: a small or blurred object's core is still part background,
    and a red-white mix is nearer plain orange than plain red."""
    palette = _COLOUR_TABLE[None] + cast[:, None]  # [N, colours, 3]
    gaps = _distance_from_lines(core[:, None], background[:, None], palette)  # [N, colours]
    return _COLOUR_NAMES[int(np.argmin(np.median(gaps, axis=0)))]


def _symmetry_strengths(weights: np.ndarray) -> dict[int, float]:
    """{k: |sum w z^k| / sum w |z|^k} for the orders the dataset's shapes have; z = pixel offset from the centroid."""
    ys, xs = np.nonzero(weights)
    w = weights[ys, xs]
    z = xs + 1j * ys
    z = z - (w * z).sum() / w.sum()
    return {k: float(abs((w * z**k).sum()) / max((w * abs(z) ** k).sum(), 1e-9)) for k in SHAPE_OF_ORDER}


def _classify_shape(weights: np.ndarray) -> str:
    strengths = _symmetry_strengths(weights)
    order = max(strengths, key=strengths.get)
    return SHAPE_OF_ORDER[order] if strengths[order] >= SYMMETRY_MIN else "circle"
