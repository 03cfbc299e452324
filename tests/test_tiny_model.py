"""The embedded trained tiny model (fluxrt/weights/tiny, `python -m fluxrt.train_tiny`): it loads through the normal
loaders and diffusers, draws what held-out prompts ask for (measured by fluxrt.shapes_eval, which shares no weights
with it), and is the CLI's default model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fluxrt
from fluxrt import shapes, shapes_eval
from fluxrt.tiny import TRAINED

# Floors a little under what the shipped weights measured on these 16 held-out scenes at the folder's defaults (true
# CFG 3): colour 1.0, shape 0.9375, background 0.6875 (README, "The tiny model": 64 scenes give 1.0 / 0.92 / 0.73).
COLOUR_FLOOR = 0.9
SHAPE_FLOOR = 0.85
BACKGROUND_FLOOR = 0.6


@pytest.fixture(scope="module")
def pipe():
    return fluxrt.FluxPipeline.from_pretrained(TRAINED, device="cpu", compile=False, progress=False)


def test_the_folder_is_a_diffusers_pipeline_with_the_models_sampling_defaults(pipe):
    index = json.loads((TRAINED / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["_fluxrt_sampling"] == {"num_steps": pipe.default_steps, "max_sequence_length":
                                         pipe.max_sequence_length, "width": 64, "height": 64,
                                         "true_cfg_scale": pipe.default_true_cfg_scale, "negative_prompt": ""}
    assert pipe.default_true_cfg_scale > 1  # trained with caption dropout for true CFG, and drawn with it
    assert not pipe.config.guidance_embed  # schnell-style: no guidance input
    # the normal loaders read each part on its own too
    assert fluxrt.load_transformer(TRAINED / "transformer", dtype=torch.float32).params == pipe.config
    assert fluxrt.load_autoencoder(TRAINED / "vae", dtype=torch.float32).params == pipe.autoencoder.params


def test_heldout_prompts_are_drawn(pipe):
    scenes = shapes_eval.heldout_scenes(16, seed=0)
    images = pipe([shapes.caption(s) for s in scenes], seed=0, output_type="pt")
    pixels = [(img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for img in images]
    score = shapes_eval.adherence(pixels, scenes)
    assert score["colour"] >= COLOUR_FLOOR and score["shape"] >= SHAPE_FLOOR, score
    assert score["background"] >= BACKGROUND_FLOOR, score


def test_a_prompt_decides_the_picture(pipe):
    # same seed, different prompts: different colours (the text conditioning is used; the colours themselves are
    # what test_heldout_prompts_are_drawn grades)
    red = shapes.Scene((shapes.Shape("red", "circle", "center"),), ("white",))
    blue = shapes.Scene((shapes.Shape("blue", "circle", "center"),), ("white",))
    images = pipe([shapes.caption(red), shapes.caption(blue)], seed=[3, 3], output_type="pt")
    pixels = [(img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for img in images]
    colours = [shapes_eval.measure(p, s)[0] for p, s in zip(pixels, (red, blue))]
    assert None not in colours and colours[0] != colours[1], colours


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])  # off, and diffusers' true CFG with the empty negative prompt
def test_diffusers_draws_the_same_image_from_the_folder(pipe, true_cfg_scale):
    import diffusers
    theirs = diffusers.FluxPipeline.from_pretrained(TRAINED, torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    prompt = "a large green star at the top right on a black background"
    expected = theirs(prompt, height=64, width=64, num_inference_steps=pipe.default_steps, guidance_scale=0.0,
                      negative_prompt="", true_cfg_scale=true_cfg_scale, max_sequence_length=pipe.max_sequence_length,
                      generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    ours = pipe(prompt, seed=5, negative_prompt="", true_cfg_scale=true_cfg_scale, output_type="pt")
    assert np.abs(ours[0].permute(1, 2, 0).numpy() - expected).max() <= 2e-3


def test_generate_defaults_to_the_tiny_model(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run([sys.executable, "-m", "fluxrt", "generate", "--prompt",
                             "a large red circle at the center on a white background", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "64x64, 20 steps" in result.stdout and str(TRAINED) in result.stdout
    from PIL import Image

    pixels = np.asarray(Image.open(out).convert("RGB"))
    scene = shapes.Scene((shapes.Shape("red", "circle", "center"),), ("white",))
    assert shapes_eval.measure(pixels, scene)[0] == "red"
