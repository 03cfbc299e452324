"""fluxrt.FluxPipeline takes diffusers' argument names for text-to-image (num_inference_steps, guidance_scale,
max_sequence_length, negative_prompt / true_cfg_scale) with their meaning: the same image as diffusers' FluxPipeline
on the same folder; passing both spellings of one argument is an error."""

import numpy as np
import pytest
import torch

import fluxrt
from fluxrt.tiny import TRAINED

PROMPT = "a small yellow triangle at the bottom left on a gray background"


@pytest.fixture(scope="module")
def pipe():
    return fluxrt.FluxPipeline.from_pretrained(TRAINED, device="cpu", compile=False, progress=False)


@pytest.mark.parametrize("max_sequence_length", [80, 24])  # the model's, and one that cuts the prompt
def test_diffusers_names_draw_what_diffusers_draws(pipe, max_sequence_length):
    import diffusers

    theirs = diffusers.FluxPipeline.from_pretrained(TRAINED, torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=6, guidance_scale=3.5, max_sequence_length=max_sequence_length,
                negative_prompt="", true_cfg_scale=2.0, height=64, width=64)
    expected = theirs(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **call).images[0]
    ours = pipe(PROMPT, seed=7, output_type="pt", **call)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() <= 2e-3


def test_a_shorter_t5_length_changes_the_conditioning(pipe):
    full, cut = (pipe.encode_prompt([PROMPT], length)[0] for length in (80, 24))
    assert full.shape[1] == 80 and cut.shape[1] == 24
    assert not torch.equal(full[:, :24], cut)  # T5 attends over the whole padded sequence, so every token moves


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_steps=4, num_inference_steps=4), TypeError, "pass num_steps or num_inference_steps"),
    (dict(guidance=3.5, guidance_scale=3.5), TypeError, "pass guidance or guidance_scale"),
    (dict(max_sequence_length=0), ValueError, "max_sequence_length must be between 1 and 512"),
    (dict(max_sequence_length=513), ValueError, "max_sequence_length must be between 1 and 512"),
    (dict(max_sequence_length=64.0), TypeError, "max_sequence_length must be an int"),
    (dict(num_inference_steps=0), ValueError, "num_steps must be between 1 and 1000"),
])
def test_bad_diffusers_named_arguments_are_refused(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(PROMPT, **kwargs)
