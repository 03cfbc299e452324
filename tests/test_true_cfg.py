"""True classifier-free guidance in fluxrt.FluxPipeline (negative_prompt, true_cfg_scale: diffusers' names and
semantics): a second transformer pass a step with the negative prompt, negative + scale * (prompt - negative).
Parity with diffusers' own true CFG is tested on the trained tiny model (tests/test_tiny_model.py)."""

import logging

import pytest
import torch

import fluxrt
from fluxrt.convert import CheckpointError
from fluxrt.pipeline import check_sampling_defaults
from fluxrt.tiny import tiny_random_pipeline

SMALL = dict(width=32, height=32, num_steps=2, seed=3, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(device="cpu", compile=False, progress=False)


def test_guidance_is_the_extrapolation_of_two_passes(pipe):
    calls = []
    transformer = pipe.transformer

    def recording(**kwargs):
        calls.append(kwargs["txt"])
        return transformer(**kwargs)

    pipe.transformer = recording
    try:
        guided = pipe("a red circle", negative_prompt="a blue square", true_cfg_scale=4.0, **SMALL)
    finally:
        pipe.transformer = transformer
    positive, negative = (pipe.encode_prompt([p])[0] for p in ("a red circle", "a blue square"))
    assert len(calls) == 4  # 2 steps x (prompt, negative prompt)
    torch.testing.assert_close(calls[0], positive, rtol=0, atol=0)
    torch.testing.assert_close(calls[1], negative, rtol=0, atol=0)
    plain = pipe("a red circle", **SMALL)
    assert (guided - plain).abs().max() > 1e-3  # guidance changes the picture


def test_scale_one_is_off_and_a_negative_prompt_there_is_ignored_with_a_warning(pipe, caplog):
    plain = pipe("a red circle", **SMALL)
    with caplog.at_level(logging.WARNING, logger="fluxrt"):
        ignored = pipe("a red circle", negative_prompt="", true_cfg_scale=1, **SMALL)
    torch.testing.assert_close(ignored, plain, rtol=0, atol=0)
    assert "negative_prompt is ignored at true_cfg_scale=1" in caplog.text


def test_one_negative_prompt_per_prompt(pipe):
    both = pipe(["a red circle", "a blue star"], negative_prompt=["", "a circle"], true_cfg_scale=3, **SMALL)
    first = pipe("a red circle", negative_prompt="", true_cfg_scale=3, **SMALL)
    second = pipe("a blue star", negative_prompt="a circle", true_cfg_scale=3, **{**SMALL, "seed": 4})  # image 1: 3+1
    # a batch of two rounds differently from one image alone: ~1e-6
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(true_cfg_scale=3), ValueError, "true_cfg_scale=3 needs a negative_prompt to guide away from"),
    (dict(true_cfg_scale=0.5, negative_prompt=""), ValueError, "true_cfg_scale must be >= 1"),
    (dict(true_cfg_scale=float("nan"), negative_prompt=""), ValueError, "true_cfg_scale must be a number in"),
    (dict(true_cfg_scale="3", negative_prompt=""), TypeError, "true_cfg_scale must be a number, got str"),
    (dict(true_cfg_scale=3, negative_prompt=["", ""]), ValueError, "negative_prompt has 2 entries for 1 prompts"),
    (dict(true_cfg_scale=3, negative_prompt=7), TypeError, "negative_prompt must be a string or a list of strings"),
])
def test_bad_guidance_arguments_are_refused_before_any_work(pipe, kwargs, error, message):
    def must_not_run(**_):
        raise AssertionError("the transformer ran before the arguments were checked")

    transformer, pipe.transformer = pipe.transformer, must_not_run
    try:
        with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
            pipe("a red circle", **kwargs, **SMALL)
    finally:
        pipe.transformer = transformer


@pytest.mark.parametrize("defaults, message", [
    ({"true_cfg_scale": 0.5}, "true_cfg_scale must be >= 1"),
    ({"true_cfg_scale": "3"}, "true_cfg_scale must be a number"),
    ({"negative_prompt": ["a", "b"]}, "negative_prompt must be one string"),
    ({"negative_prompt": 3}, "negative_prompt must be a string or a list of strings"),
    ({"num_steps": 2.5}, "must map some of"),
])
def test_a_folders_bad_guidance_defaults_are_a_checkpoint_error(defaults, message):
    with pytest.raises(CheckpointError, match=message):
        check_sampling_defaults(defaults, "model_index.json's _fluxrt_sampling")


def test_a_folders_guidance_defaults_apply(pipe):
    guided = fluxrt.FluxPipeline(pipe.transformer, pipe.autoencoder, pipe.clip_tokenizer, pipe.clip_encoder,
                                 pipe.t5_tokenizer, pipe.t5_encoder, compile=False, progress=False,
                                 sampling_defaults={"true_cfg_scale": 2.5, "negative_prompt": ""})
    torch.testing.assert_close(guided("a red circle", **SMALL),
                               pipe("a red circle", negative_prompt="", true_cfg_scale=2.5, **SMALL), rtol=0, atol=0)
    torch.testing.assert_close(guided("a red circle", true_cfg_scale=1, **SMALL), pipe("a red circle", **SMALL),
                               rtol=0, atol=0)


def test_turning_off_a_folders_default_guidance_is_silent(pipe, caplog):
    guided = fluxrt.FluxPipeline(pipe.transformer, pipe.autoencoder, pipe.clip_tokenizer, pipe.clip_encoder,
                                 pipe.t5_tokenizer, pipe.t5_encoder, compile=False, progress=False,
                                 sampling_defaults={"true_cfg_scale": 2.5, "negative_prompt": ""})
    with caplog.at_level(logging.WARNING, logger="fluxrt"):
        guided("a red circle", true_cfg_scale=1, **SMALL)
    assert "negative_prompt is ignored" not in caplog.text  # the user gave no negative prompt
