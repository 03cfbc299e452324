"""The synthetic shapes dataset (fluxrt.shapes) and the evaluator that grades images generated from it
(fluxrt.shapes_eval): the evaluator must read clean and degraded renders of every held-out prompt right, and must read
what an image shows, not what its scene asks for."""

import itertools
import re

import numpy as np
import pytest

from fluxrt.shapes import (BACKGROUNDS, COLOURS, HELDOUT, POSITIONS, SHAPES, SIZE, SIZES, Scene, Shape, caption, render,
                           sample_scenes)
from fluxrt.shapes_eval import adherence, heldout_scenes, measure, shows_background

EVERY_BACKGROUND = [(name,) for name in BACKGROUNDS] + list(itertools.permutations(BACKGROUNDS, 2))


def _one_object(colour, shape, position, size, background):
    return Scene((Shape(colour, shape, position, size),), background)


@pytest.fixture(scope="module")
def heldout_grid():
    """Every held-out triple x both sizes x every plain and two-tone background, with its clean render."""
    scenes = [_one_object(*triple, size, background)
              for triple, size, background in itertools.product(sorted(HELDOUT), SIZES, EVERY_BACKGROUND)]
    return scenes, [render(scene) for scene in scenes]


def _gaussian_blur(image, sigma):
    radius = int(3 * sigma)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(tap * padded[i:i + SIZE] for i, tap in enumerate(taps))
    return sum(tap * rows[:, i:i + SIZE] for i, tap in enumerate(taps))


def _degrade(pixels, rng, sigma, noise, cast):
    """What a blurry, noisy, slightly off generator might draw: blur, per-pixel noise, a colour cast per channel."""
    shifted = _gaussian_blur(pixels.astype(np.float64), sigma) + rng.normal(0, noise, pixels.shape)
    shifted += rng.choice([-cast, cast], size=3)
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)


def _misreadings(images, scenes):
    """(caption, measured) for each image not read as its scene's object: the message of a failed floor."""
    misread = []
    for pixels, scene in zip(images, scenes):
        measured = measure(pixels, scene)
        if measured != (scene.objects[0].colour, scene.objects[0].shape):
            misread.append((caption(scene), measured))
    return misread


# --- the evaluator on renders it must read right ---

def test_clean_renders_of_every_heldout_prompt_are_read_right(heldout_grid):
    scenes, images = heldout_grid
    result = adherence(images, scenes)  # measured: colour 1.0, shape 1.0 over 144
    assert result["n"] == len(scenes) == len(HELDOUT) * len(SIZES) * len(EVERY_BACKGROUND)
    assert result["colour"] == 1.0, _misreadings(images, scenes)
    assert result["shape"] >= 0.98, _misreadings(images, scenes)
    assert result["both"] >= 0.98
    assert result["background"] == 1.0


# (blur sigma px, noise std, colour cast per channel). Measured over the 144 renders: colour 1.0 under each; shape
# 1.0, but 0.986 under heavy noise and 0.993 under heavy blur.
DEGRADATIONS = {
    "like-a-generator": (1.0, 8.0, 15.0),
    "heavy-noise": (1.0, 24.0, 15.0),  # stray pixels touch the object: its shape is read from its connected core
    "heavy-blur": (2.0, 16.0, 25.0),  # the core is part background: its colour is read by unmixing it
    "pure-blur": (1.5, 0.0, 0.0),  # soft tips and corners: the shape is weighed by coverage, not cut at 50 %
    "strong-cast": (1.0, 4.0, 30.0),  # the whole image tinted: the background is taken as the image shows it
}


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_degraded_renders_are_read_right(heldout_grid, degradation):
    scenes, images = heldout_grid
    rng = np.random.default_rng(0)
    degraded = [_degrade(pixels, rng, *DEGRADATIONS[degradation]) for pixels in images]
    result = adherence(degraded, scenes)
    assert result["colour"] >= 0.97, _misreadings(degraded, scenes)
    assert result["shape"] >= 0.97, _misreadings(degraded, scenes)


def test_specks_beside_the_object_are_ignored(heldout_grid):
    scenes, images = heldout_grid
    specked = []
    for pixels, scene in zip(images, scenes):
        other = [name for name in COLOURS if name != scene.objects[0].colour]
        image = pixels.copy()
        for (y, x), name in zip(((0, 0), (0, 58), (58, 0), (58, 58)), other):  # corners: clear of every position
            image[y:y + 6, x:x + 6] = COLOURS[name]
        specked.append(image)
    assert _misreadings(specked, scenes) == []


# --- the evaluator reads what an image shows, not what its scene asks for ---

def _next(name, names):
    names = list(names)
    return names[(names.index(name) + 1) % len(names)]


def test_an_image_of_another_colour_and_shape_is_read_as_what_it_shows(heldout_grid):
    scenes, _ = heldout_grid
    shown = [_one_object(_next(o.colour, COLOURS), _next(o.shape, SHAPES), o.position, o.size, scene.background)
             for scene in scenes for o in scene.objects]
    images = [render(scene) for scene in shown]
    for pixels, asked, drawn in zip(images, scenes, shown):
        assert measure(pixels, asked) == (drawn.objects[0].colour, drawn.objects[0].shape), caption(drawn)
    assert adherence(images, scenes) == {"colour": 0.0, "shape": 0.0, "both": 0.0, "background": 1.0, "all": 0.0,
                                         "n": len(scenes)}


def test_colour_and_shape_are_graded_apart(heldout_grid):
    scenes, _ = heldout_grid
    recoloured = [_one_object(_next(o.colour, COLOURS), o.shape, o.position, o.size, scene.background)
                  for scene in scenes for o in scene.objects]
    result = adherence([render(scene) for scene in recoloured], scenes)
    assert (result["colour"], result["shape"], result["both"]) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("background", EVERY_BACKGROUND)
def test_a_background_without_an_object_is_read_as_nothing(background):
    asked = _one_object("red", "star", "center", "large", background)
    empty = render(Scene((), background))
    assert measure(empty, asked) == (None, None)
    assert measure(_degrade(empty, np.random.default_rng(2), *DEGRADATIONS["like-a-generator"]), asked) == (None, None)


def test_a_gray_object_is_read_as_nothing():
    asked = _one_object("purple", "square", "center", "large", ("white",))
    image = render(Scene((), ("white",)))
    image[20:44, 20:44] = BACKGROUNDS["gray"]  # far from the white background, but no colour the dataset draws
    assert measure(image, asked) == (None, None)


def test_a_dull_object_on_a_background_tinted_its_way_is_read_as_nothing():
    asked = _one_object("red", "square", "center", "large", ("white",))
    image = render(Scene((), ("white",)))
    image[...] = (255, 205, 205)  # white with a pink cast
    image[20:44, 20:44] = (160, 120, 120)  # dark pink: as colourful as the background, only darker
    assert measure(image, asked) == (None, None)


@pytest.mark.parametrize("asked_background, drawn_background", [
    (("white",), ("gray",)),  # another background
    (("black", "white"), ("white", "black")),  # a two-tone background's halves swapped
])
def test_a_wrong_background_fails_only_the_background(asked_background, drawn_background):
    asked = _one_object("blue", "square", "bottom", "large", asked_background)
    drawn = _one_object("blue", "square", "bottom", "large", drawn_background)
    assert measure(render(drawn), asked) == ("blue", "square")  # the object is graded against what the image shows
    assert not shows_background(render(drawn), asked) and shows_background(render(drawn), drawn)
    score = adherence([render(drawn)], [asked])
    assert (score["both"], score["background"], score["all"]) == (1.0, 0.0, 0.0), score


def test_a_coloured_background_is_no_colour_cast():
    asked = _one_object("blue", "square", "bottom", "large", ("gray",))
    image = render(asked)
    image[(image == BACKGROUNDS["gray"]).all(axis=-1)] = COLOURS["purple"]  # the object colour nearest to gray
    assert measure(image, asked) == (None, None)


def test_random_noise_images_score_zero():
    rng = np.random.default_rng(3)
    scenes = heldout_scenes(64, seed=3)
    noise = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in scenes]
    assert adherence(noise, scenes) == {"colour": 0.0, "shape": 0.0, "both": 0.0, "background": 0.0, "all": 0.0,
                                        "n": 64}
    # not by chance: all of it is far from the background, one blob too big to be an object
    assert {measure(pixels, scene) for pixels, scene in zip(noise, scenes)} == {(None, None)}


def test_an_image_flooded_with_the_asked_colour_is_read_as_nothing(heldout_grid):
    scenes, _ = heldout_grid
    for scene in scenes:
        flooded = np.full((SIZE, SIZE, 3), COLOURS[scene.objects[0].colour], dtype=np.uint8)
        assert measure(flooded, scene) == (None, None), caption(scene)  # no credit for painting everything red


def test_a_speck_is_read_as_nothing():
    asked = _one_object("red", "circle", "center", "small", ("black",))
    image = render(Scene((), ("black",)))
    image[30:34, 30:34] = COLOURS["red"]  # 16 pixels: smaller than any object the dataset draws
    assert measure(image, asked) == (None, None)


# --- the evaluator's inputs ---

def test_heldout_scenes_are_deterministic_heldout_prompts():
    scenes = heldout_scenes(50, seed=7)
    assert scenes == heldout_scenes(50, seed=7)
    assert scenes != heldout_scenes(50, seed=8)
    assert len(scenes) == 50
    assert all(len(s.objects) == 1 and (s.objects[0].colour, s.objects[0].shape, s.objects[0].position) in HELDOUT
               for s in scenes)


@pytest.mark.parametrize("pixels, what", [
    (np.zeros((SIZE, SIZE, 3), dtype=np.float32), "float32"),
    (np.zeros((SIZE, SIZE, 4), dtype=np.uint8), "RGBA"),
    (np.zeros((32, 32, 3), dtype=np.uint8), "smaller"),
])
def test_measure_rejects_an_image_of_the_wrong_kind(pixels, what):
    with pytest.raises(ValueError, match="expected a uint8 RGB image"):
        measure(pixels, heldout_scenes(1)[0])


def test_adherence_rejects_bad_pairings(heldout_grid):
    scenes, images = heldout_grid
    with pytest.raises(ValueError, match="one image per scene"):
        adherence(images[:3], scenes[:2])
    with pytest.raises(ValueError, match="at least one image"):
        adherence([], [])
    two_objects = Scene((Shape("red", "circle", "top left"), Shape("blue", "star", "bottom right")), ("white",))
    with pytest.raises(ValueError, match="one-object scenes"):
        adherence([render(two_objects)], [two_objects])


def test_measure_rejects_an_unknown_background(heldout_grid):
    _, images = heldout_grid
    with pytest.raises(ValueError, match="scene background must be one or two of"):
        measure(images[0], _one_object("red", "star", "center", "large", ("pink",)))


# --- the dataset ---

@pytest.fixture(scope="module")
def train_scenes():
    return sample_scenes(np.random.default_rng(0), 5000, "train")


_OBJECT = re.compile(rf"a (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
                     rf" at the (?P<position>{'|'.join(POSITIONS)})")


def _parse(text):
    """The Scene a caption of the documented form describes, or an AssertionError naming the part that is not."""
    match = re.fullmatch(r"(.+) on a (.+) background", text)
    assert match, text
    objects = []
    for part in match[1].split(" and "):
        fields = _OBJECT.fullmatch(part)
        assert fields, (part, text)
        objects.append(Shape(fields["colour"], fields["shape"], fields["position"], fields["size"]))
    background = tuple(match[2].split(" and "))
    assert all(name in BACKGROUNDS for name in background), text
    return Scene(tuple(objects), background)


def test_render_is_deterministic_uint8_with_objects_where_the_scene_puts_them(train_scenes):
    for scene in train_scenes[:50]:
        pixels = render(scene)
        assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE, 3)
        assert np.array_equal(pixels, render(scene))
        for obj in scene.objects:
            x, y = POSITIONS[obj.position]
            assert tuple(pixels[y, x]) == COLOURS[obj.colour], caption(scene)
        assert tuple(pixels[0, 0]) == BACKGROUNDS[scene.background[0]]  # corners are clear of every position
        assert tuple(pixels[-1, -1]) == BACKGROUNDS[scene.background[-1]]


@pytest.mark.parametrize("shape", SHAPES)
def test_render_centres_each_shape_on_its_position(shape):
    for (position, (x, y)), size in itertools.product(POSITIONS.items(), SIZES):
        pixels = render(_one_object("blue", shape, position, size, ("white",)))
        rows, cols = np.nonzero((pixels != BACKGROUNDS["white"]).any(axis=-1))
        assert cols.mean() + 0.5 == pytest.approx(x, abs=1e-9), position  # every shape is mirror-symmetric upright
        if shape in ("circle", "square"):
            assert rows.mean() + 0.5 == pytest.approx(y, abs=1e-9), position


def test_captions_have_the_documented_form(train_scenes):
    for scene in train_scenes[:500] + heldout_scenes(50):
        assert _parse(caption(scene)) == scene


def test_train_sampling_never_yields_a_heldout_triple_or_two_objects_at_one_place(train_scenes):
    assert {len(scene.objects) for scene in train_scenes} == {1, 2}
    for scene in train_scenes:
        assert not {(o.colour, o.shape, o.position) for o in scene.objects} & HELDOUT, caption(scene)
        assert len({o.position for o in scene.objects}) == len(scene.objects), caption(scene)
        assert len(set(scene.background)) == len(scene.background) in (1, 2), caption(scene)


def test_heldout_sampling_yields_every_heldout_triple_and_nothing_else():
    scenes = sample_scenes(np.random.default_rng(1), 400, "heldout")
    triples = [(o.colour, o.shape, o.position) for scene in scenes for o in scene.objects]
    assert len(triples) == len(scenes)
    assert set(triples) == HELDOUT


def test_every_word_appears_in_training_captions(train_scenes):
    parsed = [_parse(caption(scene)) for scene in train_scenes]
    objects = [o for scene in parsed for o in scene.objects]
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {o.size for o in objects} == set(SIZES)
    assert {name for scene in parsed for name in scene.background} == set(BACKGROUNDS)


def test_sample_scenes_rejects_an_unknown_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        sample_scenes(np.random.default_rng(0), 3, "test")
