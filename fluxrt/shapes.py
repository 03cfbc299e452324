"""The synthetic captioned dataset the embedded `tiny` model is trained on: coloured shapes on plain or two-tone
backgrounds, drawn deterministically in code (numpy), with captions such as
"a small red circle at the top left on a white background".

    spec = Scene(objects=(Shape("red", "circle", "top left", "small"),), background=("white",))
    pixels = render(spec)                      # uint8 [SIZE, SIZE, 3]
    caption(spec)                              # "a small red circle at the top left on a white background"
    specs = sample_scenes(rng, n, split="train")   # or split="heldout": caption combinations never trained on

Held out: a fixed set of (colour, shape, position) triples never appears in a training caption (a held-out scene
has exactly one object, one of those triples), so evaluation asks for combinations the model has not seen, built
from words it has. fluxrt.shapes_eval measures what a generated image shows, without the generator's weights.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels a side
SUPERSAMPLE = 4  # anti-aliased edges: each pixel is the mean of 4x4 sub-samples

COLOURS = {  # object colours (RGB); far apart from each other and from every background colour
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 8.0, "large": 12.0}  # outer radius in pixels
# 3x3 grid of positions: caption words -> centre (x, y) in pixels
POSITIONS = {
    f"{row}{' ' if row and col else ''}{col}" or "center": (x, y)
    for (row, y), (col, x) in itertools.product((("top", 16), ("", 32), ("bottom", 48)),
                                                (("left", 16), ("", 32), ("right", 48)))
}
# (colour, shape, position) triples that never appear in training captions: one per colour, shapes and positions
# spread so every colour, shape and position word is still trained on in other combinations.
HELDOUT = frozenset({
    ("red", "star", "center"), ("green", "circle", "top left"), ("blue", "triangle", "bottom right"),
    ("yellow", "square", "top right"), ("purple", "circle", "bottom left"), ("orange", "star", "top"),
    ("red", "triangle", "left"), ("blue", "square", "bottom"),
})


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    position: str
    size: str = "large"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: tuple[str, ...]  # one colour (plain) or two (top half, bottom half)


def caption(scene: Scene) -> str:
    """'a small red circle at the top left and a large blue star at the right on a white and gray background'."""
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in scene.objects]
    return " and ".join(parts) + f" on a {' and '.join(scene.background)} background"


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Whether the sub-samples at offsets (dx, dy) from the centre (y down) lie inside `shape` of outer radius r."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = r * 0.82
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, equilateral, inscribed in the circle of radius r
        inside = dy <= r / 2  # the base
        for sign in (-1, 1):  # the two sloped sides through the apex (0, -r)
            inside &= sign * dx * np.sqrt(3) - dy <= r  # |x| * sqrt(3) <= r + y
        return inside
    if shape == "star":  # five points, apex up; the boundary linear in polar angle between outer and inner radii
        angle = np.mod(np.arctan2(dx, -dy), 2 * np.pi / 5) / (2 * np.pi / 5)  # 0 at a point, 0.5 between two
        edge = r - (r - 0.45 * r) * (1 - np.abs(1 - 2 * angle))
        return np.hypot(dx, dy) <= edge
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 RGB [SIZE, SIZE, 3]; the same scene always gives the same pixels."""
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # sub-sample centres in pixel units
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    image = np.empty((n, n, 3))
    top, bottom = scene.background[0], scene.background[-1]
    image[: n // 2], image[n // 2 :] = BACKGROUNDS[top], BACKGROUNDS[bottom]
    for obj in scene.objects:
        cx, cy = POSITIONS[obj.position]
        image[_shape_mask(obj.shape, xs - cx, ys - cy, SIZES[obj.size])] = COLOURS[obj.colour]
    pixels = image.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.rint(pixels).astype(np.uint8)


def _random_shape(rng: np.random.Generator, taken: set[str]) -> Shape:
    while True:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        position = str(rng.choice(list(POSITIONS)))
        if (colour, shape, position) not in HELDOUT and position not in taken:
            return Shape(colour, shape, position, str(rng.choice(list(SIZES))))


def _random_background(rng: np.random.Generator) -> tuple[str, ...]:
    names = list(BACKGROUNDS)
    if rng.random() < 0.5:
        return (str(rng.choice(names)),)
    first, second = rng.choice(len(names), size=2, replace=False)
    return (names[first], names[second])


def sample_scenes(rng: np.random.Generator, count: int, split: str = "train") -> list[Scene]:
    """`count` random scenes. train: 1-2 objects (never a HELDOUT triple, never two at one position);
    heldout: one object, a HELDOUT triple, random size and background."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    scenes = []
    for _ in range(count):
        if split == "heldout":
            colour, shape, position = sorted(HELDOUT)[rng.integers(len(HELDOUT))]
            objects = (Shape(colour, shape, position, str(rng.choice(list(SIZES)))),)
        else:
            first = _random_shape(rng, set())
            objects = (first,) if rng.random() < 0.6 else (first, _random_shape(rng, {first.position}))
        scenes.append(Scene(objects, _random_background(rng)))
    return scenes
