"""`fluxrt generate` in each tools mode on the offline tiny-random models (--image, --mask, --strength,
--control-image): the PNG is what the Python API draws, and each bad input is one line and exit code 2 with no file
written."""

import numpy as np
import PIL.Image
import pytest
import torch

from fluxrt.cli import main
from fluxrt.tiny import tiny_random_pipeline

W, H = 64, 48
SMALL = ["--width", str(W), "--height", str(H), "--steps", "2", "--device", "cpu", "--no-progress", "--seed", "3",
         "--prompt", "a red circle"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    PIL.Image.fromarray((rng.rand(H, W, 3) * 255).astype(np.uint8)).save(folder / "in.png")
    PIL.Image.fromarray(((rng.rand(H, W) > 0.5) * 255).astype(np.uint8)).save(folder / "mask.png")
    PIL.Image.fromarray(((rng.rand(32, W) > 0.5) * 255).astype(np.uint8)).save(folder / "small_mask.png")
    (folder / "text.png").write_text("not an image")
    return folder


MODES = {  # name: (--model, flags, the pipeline's mode, the Python call's image arguments)
    "img2img": ("tiny-random", ["--image", "in.png", "--strength", "0.7"], "text-to-image",
                dict(image="in.png", strength=0.7)),
    "inpaint": ("tiny-random", ["--image", "in.png", "--mask", "mask.png"], "text-to-image",
                dict(image="in.png", mask_image="mask.png")),
    "fill": ("tiny-random-fill", ["--image", "in.png", "--mask", "mask.png"], "fill",
             dict(image="in.png", mask_image="mask.png")),
    "canny": ("tiny-random-canny", ["--control-image", "in.png"], "control", dict(control_image="in.png")),
    "kontext": ("tiny-random-kontext", ["--image", "in.png", "--no-auto-resize"], "kontext",
                dict(image="in.png", max_area=W * H, _auto_resize=False)),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(MODES))
def test_each_mode_writes_what_the_python_api_draws(files, tmp_path, capsys, name):
    model, flags, mode, images = MODES[name]
    flags = [str(files / f) if f.endswith(".png") else f for f in flags]
    out = tmp_path / "out.png"
    assert main(["generate", "--model", model, "--no-compile", *SMALL, *flags, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    pipe = tiny_random_pipeline(device="cpu", compile=False, progress=False, mode=mode)
    opened = {k: (PIL.Image.open(files / v) if isinstance(v, str) else v) for k, v in images.items()}
    expected = pipe("a red circle", width=W, height=H, num_steps=2, seed=3, **opened)[0]
    written = np.asarray(PIL.Image.open(out).convert("RGB"), dtype=int)
    assert np.abs(written - np.asarray(expected, dtype=int)).max() == 0


@pytest.mark.parametrize("model, flags, message", [
    ("tiny-random", ["--image", "missing.png"], "--image '.*missing.png' does not exist"),
    ("tiny-random", ["--image", "text.png"], "is not an image file PIL can read"),
    ("tiny-random", ["--image", "in.png", "--mask", "small_mask.png"], "the mask is 64x32 pixels but the image is"),
    ("tiny-random", ["--mask", "mask.png"], "--mask goes with --image"),
    ("tiny-random", ["--strength", "0.5"], "--strength goes with --image"),
    ("tiny-random", ["--image", "in.png", "--strength", "2"], r"strength must be a number in \[0, 1\]"),
    ("tiny-random-kontext", ["--image", "in.png", "--mask", "mask.png"], "--mask needs"),
    ("tiny-random-fill", ["--image", "in.png"], "a Fill model needs --mask"),
    ("tiny-random", ["--control-image", "in.png"], "--control-image needs a Canny/Depth model"),
    ("tiny-random", ["--no-auto-resize"], "--no-auto-resize goes with a Kontext model's --image"),
])
def test_mode_errors_are_one_line_and_exit_2(files, tmp_path, capsys, model, flags, message):
    import re

    flags = [str(files / f) if f.endswith(".png") else f for f in flags]
    out = tmp_path / "out.png"
    assert main(["generate", "--model", model, "--no-compile", *SMALL, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()
