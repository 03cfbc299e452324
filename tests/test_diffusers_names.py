"""fluxrt.FluxPipeline takes diffusers' argument names for text-to-image with their meaning: the same image as
diffusers' FluxPipeline on the same folder (fluxrt.tiny.TRAINED, fp32) within 1e-4 in [0, 1] pixels, for
num_inference_steps, guidance_scale, max_sequence_length, negative_prompt / true_cfg_scale, generator (one or a list),
latents, prompt_embeds / pooled_prompt_embeds (and the negatives), prompt_2 / negative_prompt_2, sigmas, output_type
"np" / "latent", return_dict and callback_on_step_end. Passing both spellings of one argument, or any bad value, is one
clear error before any work.

The two pipelines agree to ~1e-6 in fp32. One thing is not fluxrt's: diffusers' AutoencoderKL decodes a batch of two
up to ~2e-4 away from decoding each image alone (its convolutions pick other CPU kernels by batch size, and the tiny
trained autoencoder amplifies that), so the reference decodes one image at a time (vae.enable_slicing(): the same
math, one image per decode). fluxrt's autoencoder gives the same pixels either way (~2e-6).
"""

import numpy as np
import pytest
import torch

import fluxrt
from fluxrt.call_inputs import FluxPipelineOutput
from fluxrt.tiny import TRAINED

PROMPT = "a small yellow triangle at the bottom left on a gray background"
OTHER = "a big blue circle in the middle on a white background"
TOLERANCE = 1e-4  # [0, 1] pixels, and latents
# every default the two pipelines do not share is given: diffusers' 512 T5 tokens and true_cfg_scale 1, the tiny
# folder's 80 tokens and true CFG at 3 with ""
CALL = dict(height=64, width=64, num_inference_steps=4, max_sequence_length=80, true_cfg_scale=2.0, output_type="np",
            return_dict=True)


@pytest.fixture(scope="module")
def pipe():
    return fluxrt.FluxPipeline.from_pretrained(TRAINED, device="cpu", compile=False, progress=False)


@pytest.fixture(scope="module")
def theirs():
    import diffusers

    reference = diffusers.FluxPipeline.from_pretrained(TRAINED, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.vae.enable_slicing()  # see the module docstring
    return reference


def seeded(*seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return generators[0] if len(generators) == 1 else generators


def assert_same(ours, expected):
    ours, expected = torch.as_tensor(np.asarray(ours)), torch.as_tensor(np.asarray(expected))
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    error = (ours - expected).abs().max().item()
    assert error <= TOLERANCE, f"fluxrt is {error:.2e} away from diffusers (tolerance {TOLERANCE})"


@pytest.mark.parametrize("max_sequence_length", [80, 24])  # the model's, and one that cuts the prompt
def test_diffusers_names_draw_what_diffusers_draws(pipe, theirs, max_sequence_length):
    call = dict(num_inference_steps=6, guidance_scale=3.5, max_sequence_length=max_sequence_length,
                negative_prompt="", true_cfg_scale=2.0, height=64, width=64)
    expected = theirs(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **call).images[0]
    ours = pipe(PROMPT, seed=7, output_type="pt", **call)[0].permute(1, 2, 0).numpy()
    assert_same(ours, expected)


def embeds(theirs, prompt, length=80):
    prompt_embeds, pooled, _ = theirs.encode_prompt(prompt, None, max_sequence_length=length)
    return prompt_embeds, pooled


# each case: the call's own arguments, made afresh for each pipeline (a generator is used up by drawing)
CASES = {
    "one generator for two images": lambda _: dict(prompt=PROMPT, negative_prompt="", num_images_per_prompt=2,
                                                   generator=seeded(3)),
    "one generator per image": lambda _: dict(prompt=[PROMPT, OTHER], negative_prompt=["", ""],
                                              generator=seeded(3, 4)),
    "latents": lambda _: dict(prompt=PROMPT, negative_prompt="",
                              latents=torch.randn(1, 16, 64, generator=seeded(11))),
    "prompt_embeds": lambda theirs: dict(zip(("prompt_embeds", "pooled_prompt_embeds"), embeds(theirs, PROMPT)))
    | dict(zip(("negative_prompt_embeds", "negative_pooled_prompt_embeds"), embeds(theirs, ""))) | dict(
        generator=seeded(5)),
    # T5 embeddings of 40 tokens beside a negative prompt encoded to max_sequence_length (80): each pass its own
    "prompt_embeds of their own length": lambda theirs: dict(
        zip(("prompt_embeds", "pooled_prompt_embeds"), embeds(theirs, PROMPT, 40))) | dict(negative_prompt="",
                                                                                           generator=seeded(12)),
    "prompt_2": lambda _: dict(prompt=PROMPT, prompt_2=OTHER, negative_prompt="", negative_prompt_2="a gray square",
                               generator=seeded(6)),
    "sigmas": lambda _: dict(prompt=PROMPT, negative_prompt="", sigmas=[1.0, 0.7, 0.4, 0.15], generator=seeded(7)),
    "output_type latent": lambda _: dict(prompt=PROMPT, negative_prompt="", generator=seeded(8),
                                         output_type="latent"),
}


@pytest.mark.parametrize("case", CASES)
def test_diffusers_arguments_give_diffusers_images(pipe, theirs, case):
    expected = theirs(**CALL | CASES[case](theirs)).images
    assert_same(pipe(**CALL | CASES[case](theirs)).images, expected)


def test_np_output_is_the_pt_output_laid_out_as_diffusers(pipe):
    pt = pipe(PROMPT, **CALL | dict(output_type="pt", return_dict=None))
    np_images = pipe(PROMPT, **CALL | dict(return_dict=None))
    assert isinstance(np_images, np.ndarray) and np_images.dtype == np.float32 and np_images.shape == (1, 64, 64, 3)
    assert np.array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())


def test_sigmas_set_the_steps(pipe):
    steps = []
    pipe(PROMPT, sigmas=[1.0, 0.5, 0.2], callback=lambda step, total: steps.append(total),
         **CALL | dict(num_inference_steps=None))
    assert steps == [3, 3, 3]


def test_return_dict(pipe):
    plain = pipe(PROMPT, **CALL | dict(output_type="pt", return_dict=None))
    assert isinstance(plain, torch.Tensor)
    out = pipe(PROMPT, **CALL | dict(output_type="pt", return_dict=True))
    assert isinstance(out, FluxPipelineOutput) and out[0] is out.images and out["images"] is out.images
    torch.testing.assert_close(out.images, plain, rtol=0, atol=0)
    as_tuple = pipe(PROMPT, **CALL | dict(output_type="pt", return_dict=False))
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], plain, rtol=0, atol=0)
    with pytest.raises(KeyError, match="FluxPipelineOutput holds only images"):
        out[1]


def test_pil_output_by_default(pipe):
    images = pipe(PROMPT, height=64, width=64, num_steps=1)
    assert isinstance(images, list) and images[0].size == (64, 64) and images[0].mode == "RGB"


class StepRecorder:
    """A diffusers callback_on_step_end that scales the latents at step 1 and records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, pipe, step_index, timestep, callback_kwargs):
        self.calls.append((pipe, step_index, timestep, {k: v.clone() for k, v in callback_kwargs.items()}))
        if step_index == 1:
            callback_kwargs["latents"] = callback_kwargs["latents"] * 0.8
        return callback_kwargs


def test_callback_on_step_end_edits_latents_and_reads_prompt_embeds_as_in_diffusers(pipe, theirs):
    inputs = ["latents", "prompt_embeds"]
    recorders = StepRecorder(), StepRecorder()
    results = [p(PROMPT, negative_prompt="", generator=seeded(9), callback_on_step_end=recorder,
                 callback_on_step_end_tensor_inputs=inputs, **CALL).images
               for p, recorder in zip((theirs, pipe), recorders)]
    assert_same(results[1], results[0])
    unedited = pipe(PROMPT, negative_prompt="", generator=seeded(9), **CALL).images
    assert np.abs(unedited - results[1]).max() > 1e-2  # the edit reached the image
    expected, ours = recorders
    assert [c[0] for c in ours.calls] == [pipe] * 4 and [c[1] for c in ours.calls] == [0, 1, 2, 3]
    for (_, _, t_theirs, seen_theirs), (_, _, t_ours, seen_ours) in zip(expected.calls, ours.calls):
        assert isinstance(t_ours, torch.Tensor) and t_ours.dtype == torch.float32
        torch.testing.assert_close(t_ours, t_theirs, rtol=0, atol=1e-4)  # sigma * 1000
        assert seen_ours.keys() == set(inputs)
        for name in inputs:
            torch.testing.assert_close(seen_ours[name], seen_theirs[name], rtol=0, atol=1e-4)


def test_callback_on_step_end_replaces_prompt_embeds(pipe):
    other, _ = pipe.encode_prompt([OTHER])
    after_first_step = []

    def swap(pipe, step_index, timestep, callback_kwargs):
        if step_index > 0:
            return {}
        after_first_step.append(callback_kwargs["latents"].clone())
        return {"prompt_embeds": other}

    call = CALL | dict(true_cfg_scale=1.0, num_inference_steps=None)
    swapped = pipe(PROMPT, callback_on_step_end=swap, sigmas=[1.0, 0.75, 0.5, 0.25], seed=2, **call).images
    # the remaining steps from there, with the other prompt's T5 embeddings (and PROMPT's CLIP pooled vector)
    rest = pipe(prompt_embeds=other, pooled_prompt_embeds=pipe.encode_prompt([PROMPT])[1], latents=after_first_step[0],
                sigmas=[0.75, 0.5, 0.25], **call).images
    assert_same(swapped, rest)
    plain = pipe(PROMPT, sigmas=[1.0, 0.75, 0.5, 0.25], seed=2, **call).images
    assert np.abs(plain - swapped).max() > 1e-2  # the swap changed the image


def test_a_shorter_t5_length_changes_the_conditioning(pipe):
    full, cut = (pipe.encode_prompt([PROMPT], length)[0] for length in (80, 24))
    assert full.shape[1] == 80 and cut.shape[1] == 24
    assert not torch.equal(full[:, :24], cut)  # T5 attends over the whole padded sequence, so every token moves


class OnCuda(torch.Generator):
    """A generator that says it is on a CUDA device (a CPU-only torch cannot make a real one)."""

    @property
    def device(self):
        return torch.device("cuda")


EMBEDS = dict(prompt_embeds=torch.randn(1, 80, 64), pooled_prompt_embeds=torch.randn(1, 32))  # tiny: T5 64, CLIP 32
NEGATIVE_EMBEDS = dict(negative_prompt_embeds=torch.randn(1, 80, 64), negative_pooled_prompt_embeds=torch.randn(1, 32))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_steps=4, num_inference_steps=4), TypeError, "pass num_steps or num_inference_steps"),
    (dict(guidance=3.5, guidance_scale=3.5), TypeError, "pass guidance or guidance_scale"),
    (dict(max_sequence_length=0), ValueError, "max_sequence_length must be between 1 and 512"),
    (dict(max_sequence_length=513), ValueError, "max_sequence_length must be between 1 and 512"),
    (dict(max_sequence_length=64.0), TypeError, "max_sequence_length must be an int"),
    (dict(num_inference_steps=0), ValueError, "num_steps must be between 1 and 1000"),
    # text: diffusers' check_inputs rules
    (dict(prompt=None), TypeError, r"prompt is required: a string or a list of strings \(or prompt_embeds"),
    (EMBEDS, ValueError, "pass prompt or prompt_embeds, not both"),
    (dict(prompt=None, prompt_2="a", **EMBEDS), ValueError, "pass prompt_2 or prompt_embeds, not both"),
    (dict(prompt=None, prompt_embeds=EMBEDS["prompt_embeds"]), ValueError,
     "prompt_embeds needs pooled_prompt_embeds too"),
    (dict(prompt=None, pooled_prompt_embeds=EMBEDS["pooled_prompt_embeds"]), ValueError,
     "pooled_prompt_embeds needs prompt_embeds too"),
    (dict(pooled_prompt_embeds=EMBEDS["pooled_prompt_embeds"]), ValueError, "pooled_prompt_embeds needs prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.randn(1, 80, 63), pooled_prompt_embeds=torch.randn(1, 32)), ValueError,
     r"prompt_embeds must be \[prompts, tokens \(1..512\), 64\] \(T5's last hidden state\), got \(1, 80, 63\)"),
    (dict(prompt=None, prompt_embeds=torch.randn(1, 513, 64), pooled_prompt_embeds=torch.randn(1, 32)), ValueError,
     r"prompt_embeds must be \[prompts, tokens \(1..512\), 64\]"),
    (dict(prompt=None, prompt_embeds=torch.randn(80, 64), pooled_prompt_embeds=torch.randn(1, 32)), ValueError,
     r"got \(80, 64\)"),
    (dict(prompt=None, prompt_embeds=torch.randn(1, 80, 64), pooled_prompt_embeds=torch.randn(2, 32)), ValueError,
     r"pooled_prompt_embeds must be \[1, 32\] \(CLIP's pooled output, one row per row of prompt_embeds\)"),
    (dict(prompt=None, prompt_embeds=torch.ones(1, 80, 64, dtype=torch.int64), pooled_prompt_embeds=torch.randn(1, 32)),
     TypeError, "prompt_embeds must be a floating-point torch.Tensor, got a torch.int64 tensor"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 80, 64), float("nan")), pooled_prompt_embeds=torch.randn(1, 32)),
     ValueError, "prompt_embeds hold NaN or inf"),
    (dict(prompt=None, prompt_embeds=torch.randn(1, 80, 64), pooled_prompt_embeds=[0.0] * 32), TypeError,
     "pooled_prompt_embeds must be a floating-point torch.Tensor, got list"),
    (dict(prompt_2=["a", "b"]), ValueError, "prompt_2 has 2 entries for 1 prompts"),
    (dict(prompt_2=3), TypeError, "prompt_2 must be a string or a list of strings"),
    (dict(negative_prompt="", **NEGATIVE_EMBEDS), ValueError, "pass negative_prompt or negative_prompt_embeds"),
    (dict(negative_prompt_2="", **NEGATIVE_EMBEDS), ValueError, "pass negative_prompt_2 or negative_prompt_embeds"),
    (dict(negative_prompt_2="a"), ValueError, r"negative_prompt_2 \(T5's negative prompt\) needs negative_prompt"),
    (dict(negative_prompt_embeds=NEGATIVE_EMBEDS["negative_prompt_embeds"]), ValueError,
     "negative_prompt_embeds needs negative_pooled_prompt_embeds too"),
    (dict(negative_pooled_prompt_embeds=NEGATIVE_EMBEDS["negative_pooled_prompt_embeds"]), ValueError,
     "negative_pooled_prompt_embeds needs negative_prompt_embeds too"),
    (dict(negative_prompt="", negative_pooled_prompt_embeds=NEGATIVE_EMBEDS["negative_pooled_prompt_embeds"]),
     ValueError, "negative_pooled_prompt_embeds needs negative_prompt_embeds too"),
    (dict(prompt=["a", "b"], **NEGATIVE_EMBEDS), ValueError, "negative_prompt_embeds has 1 rows for 2 prompts"),
    (dict(prompt=None, **EMBEDS, negative_prompt_embeds=torch.randn(1, 40, 64),
          negative_pooled_prompt_embeds=torch.randn(1, 32)), ValueError,
     r"prompt_embeds \(1, 80, 64\) and negative_prompt_embeds \(1, 40, 64\) must have the same shape"),
    (dict(negative_prompt_2=["a", "b"], negative_prompt=""), ValueError, "negative_prompt_2 has 2 entries for 1"),
    # start noise
    (dict(seed=3, generator=torch.Generator()), TypeError, "pass one of seed or generator, not both"),
    (dict(seed=0, generator=torch.Generator()), TypeError, "pass one of seed or generator, not both"),
    (dict(latents=torch.randn(1, 16, 64), generator=torch.Generator()), TypeError, "pass one of generator or latents"),
    (dict(latents=torch.randn(1, 16, 64), seed=1), TypeError, "pass one of seed or latents"),
    (dict(generator=7), TypeError, r"generator must be a torch.Generator \(or generator a list of one per image\), "
                                   "got int"),
    (dict(generator=[torch.Generator(), 7], prompt=["a", "b"]), TypeError, r"generator\[1\] must be a torch.Generator"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "got 3 generators for 1 images; pass one generator, or one"),
    (dict(generator=OnCuda()), ValueError, r"the generators are on \['cuda'\] and the pipeline on cpu: pass CPU"),
    (dict(generator=[torch.Generator(), OnCuda()], prompt=["a", "b"]), ValueError,
     r"the generators are on \['cpu', 'cuda'\] .* all on one device"),
    (dict(latents=torch.randn(1, 16, 8, 8)), ValueError, r"latents \(1, 16, 8, 8\) are unpacked \[images, channels, "
                                                          r"h, w\]: pass them packed \(1, 16, 64\) as diffusers does, "
                                                          r"fluxrt.sampling.pack\(latents\)"),
    (dict(latents=torch.randn(1, 17, 64)), ValueError, r"latents must be \(1, 16, 64\) for 1 images of 64 x 64"),
    (dict(latents=torch.randn(2, 16, 64)), ValueError, r"latents must be \(1, 16, 64\)"),
    (dict(latents=torch.ones(1, 16, 64, dtype=torch.int32)), TypeError, "latents must be a floating-point"),
    (dict(latents=torch.full((1, 16, 64), float("inf"))), ValueError, "latents hold NaN or inf"),
    (dict(latents=np.zeros((1, 16, 64), np.float32)), TypeError, "latents must be a torch.Tensor"),
    # schedule
    (dict(sigmas=[], num_inference_steps=None), ValueError, "sigmas must hold at least one noise level"),
    (dict(sigmas="1.0", num_inference_steps=None), TypeError, "sigmas must be a list of floats"),
    (dict(sigmas=[1.0, 1.5], num_inference_steps=None), ValueError, r"sigmas\[1\] must be a number in \[0, 1\]"),
    (dict(sigmas=[1.0, float("nan")], num_inference_steps=None), ValueError, r"sigmas\[1\] must be a number in"),
    (dict(sigmas=[1.0, True], num_inference_steps=None), ValueError, r"sigmas\[1\] must be a number in"),
    (dict(sigmas=[1.0] * 1001, num_inference_steps=None), ValueError, r"len\(sigmas\) must be between 1 and 1000"),
    (dict(sigmas=[1.0, 0.5]), ValueError, "num_steps / num_inference_steps = 4 disagrees with the 2 sigmas"),
    (dict(sigmas=torch.ones(2, 2), num_inference_steps=None), TypeError, "sigmas must be a list of floats"),
    # output and callback
    (dict(output_type="jpg"), ValueError, "output_type must be 'pil', 'np', 'pt' or 'latent', got 'jpg'"),
    (dict(return_dict="yes"), TypeError, r"return_dict must be None \(the images alone\), True"),
    (dict(callback_on_step_end=5), TypeError, r"callback_on_step_end must be a function \(pipe, step_index, "),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents", "noise_pred"]),
     ValueError, r"callback_on_step_end_tensor_inputs may name only \['latents', 'prompt_embeds'\], got "
                 r"\['noise_pred'\]"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs="latents"), TypeError,
     "callback_on_step_end_tensor_inputs must be a list of names"),
])
def test_bad_diffusers_named_arguments_are_refused_before_any_work(pipe, kwargs, error, message):
    call = dict(prompt=PROMPT) | CALL | kwargs
    modules = (pipe.t5_encoder, pipe.clip_encoder, pipe.transformer, pipe.autoencoder)
    ran = []
    handles = [m.register_forward_pre_hook(lambda module, args: ran.append(type(module).__name__)) for m in modules]
    try:
        with pytest.raises(error, match=message):
            pipe(**call)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [], f"{ran} ran before the arguments were checked"


@pytest.mark.parametrize("returned, error, message", [
    (None, TypeError, "callback_on_step_end must return a dict .* got NoneType at step index 0"),
    ({"noise_pred": torch.zeros(1)}, ValueError, r"returned \['noise_pred'\] at step index 0; it may return only"),
    ({"latents": torch.zeros(1, 16, 32)}, ValueError, r"latents returned at step index 0 must be a floating tensor of "
                                                       r"shape \(1, 16, 64\)"),
])
def test_bad_callback_on_step_end_returns_are_refused(pipe, returned, error, message):
    with pytest.raises(error, match=message):
        pipe(PROMPT, callback_on_step_end=lambda *args: returned, **CALL)
