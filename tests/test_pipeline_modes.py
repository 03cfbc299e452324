"""fluxrt.FluxPipeline's tools modes (img2img, inpaint, Fill, Canny/Depth, Kontext) against the matching diffusers
pipeline holding the same tiny random weights (transformer, autoencoder, text encoders), with the same images and
seeds (diffusers given a generator list equal to fluxrt's per-image seeds): the same pixels within 1e-4 in fp32.
And each mode's argument errors, before any work."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tiny_pipeline import diffusers_vae_twin

import fluxrt
from fluxrt.tiny import tiny_random_components

H, W = 48, 64
PROMPTS = ["a red circle", "a blue square"]
SEEDS = [61, 62]
DIFFUSERS = {"img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline", "fill": "FluxFillPipeline",
             "control": "FluxControlPipeline", "kontext": "FluxKontextPipeline"}
MODEL = {"img2img": "text-to-image", "inpaint": "text-to-image", "fill": "fill", "control": "control",
         "kontext": "kontext"}


def pil(seed: int, width: int, height: int, mode: str = "RGB") -> PIL.Image.Image:
    values = np.random.RandomState(seed).rand(height, width, 3 if mode == "RGB" else 1) * 255
    image = PIL.Image.fromarray(values.astype(np.uint8).squeeze())
    return image.convert(mode)


IMAGE, MASK = pil(100, 70, 52), pil(101, W, H, "L")
ARGUMENTS = {"img2img": dict(image=IMAGE, strength=0.7), "inpaint": dict(image=IMAGE, mask_image=MASK, strength=0.7),
             "fill": dict(image=IMAGE, mask_image=MASK), "control": dict(control_image=IMAGE),
             "kontext": dict(image=IMAGE, _auto_resize=False, max_area=H * W)}


def diffusers_twin(parts: dict, pipeline: str):
    """The diffusers pipeline `pipeline` with fluxrt's components' weights (the text encoders are the same objects)."""
    flux, ae = parts["transformer"], parts["autoencoder"]
    transformer = FluxTransformer2DModel(**flux.params.to_diffusers()).eval()
    transformer.load_state_dict(fluxrt.bfl_to_diffusers(flux.state_dict()), strict=True)
    vae = diffusers_vae_twin(ae)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    twin = getattr(diffusers, pipeline)(scheduler=scheduler, vae=vae, text_encoder=parts["clip_encoder"],
                                        tokenizer=parts["clip_tokenizer"], text_encoder_2=parts["t5_encoder"],
                                        tokenizer_2=parts["t5_tokenizer"], transformer=transformer)
    twin.set_progress_bar_config(disable=True)
    return twin


@pytest.fixture(scope="module", params=list(DIFFUSERS))
def pair(request):
    mode = request.param
    parts = tiny_random_components(MODEL[mode], device="cpu", full_width=False, seed=4)
    twin = diffusers_twin(parts, DIFFUSERS[mode])
    ours = fluxrt.FluxPipeline(**parts, compile=False, progress=False, mode=MODEL[mode])
    return mode, ours, twin


@torch.no_grad()
def test_each_mode_draws_what_its_diffusers_pipeline_draws(pair):
    mode, ours, twin = pair
    call = dict(height=H, width=W, num_inference_steps=3, guidance_scale=3.5, **ARGUMENTS[mode])
    expected = twin(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np",
                    **call).images
    got = ours(PROMPTS, seed=SEEDS, output_type="np", **call)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4, f"{mode}: {np.abs(got - expected).max():.2e}"


@pytest.mark.parametrize("mode", list(DIFFUSERS))
def test_each_mode_defaults_to_its_diffusers_pipelines_defaults(mode):
    """guidance, steps and strength a call gets when it does not say, read from the diffusers pipeline's signature
    (FLUX.1-dev's model defaults are 28 steps and 3.5)."""
    import inspect

    theirs = inspect.signature(getattr(diffusers, DIFFUSERS[mode]).__call__).parameters
    parts = tiny_random_components(MODEL[mode], device="cpu", full_width=False)
    pipe = fluxrt.FluxPipeline(**parts, compile=False, progress=False, mode=MODEL[mode], sampling_defaults={
        "num_steps": 28})
    args = fluxrt.modes.ModeArgs.check(pipe.mode, **{k: v for k, v in ARGUMENTS[mode].items() if k in (
        "image", "mask_image", "control_image")})
    assert pipe.resolve_guidance(None, args.mode) == theirs["guidance_scale"].default
    assert pipe.resolve_steps(None, None, args.mode)[0] == theirs["num_inference_steps"].default
    if "strength" in theirs:
        assert args.strength == theirs["strength"].default


@torch.no_grad()
def test_the_compiled_pipeline_runs_each_mode_as_the_reference_does(pair):
    mode, ours, _ = pair
    compiled = fluxrt.FluxPipeline(ours.transformer.__class__(ours.config).eval(), ours.autoencoder,
                                   ours.clip_tokenizer, ours.clip_encoder, ours.t5_tokenizer, ours.t5_encoder,
                                   compile=False, progress=False, mode=ours.mode)
    compiled.transformer.load_state_dict(ours.transformer.state_dict())
    compiled.accelerate(backend="torch")
    call = dict(height=H, width=W, num_steps=2, seed=SEEDS, output_type="pt", **ARGUMENTS[mode])
    torch.testing.assert_close(compiled(PROMPTS, **call), ours(PROMPTS, **call), atol=1e-5, rtol=0)


def test_the_conditioning_changes_the_image():
    parts = tiny_random_components("text-to-image", device="cpu", full_width=False, seed=4)
    pipe = fluxrt.FluxPipeline(**parts, compile=False, progress=False)
    call = dict(height=H, width=W, num_steps=2, seed=SEEDS[:1], output_type="pt")
    plain, edited = pipe(PROMPTS[0], **call), pipe(PROMPTS[0], image=IMAGE, strength=0.5, **call)
    other = pipe(PROMPTS[0], image=pil(7, W, H), strength=0.5, **call)
    assert (edited - plain).abs().max() > 0.05 and (edited - other).abs().max() > 0.05


@pytest.fixture(scope="module")
def by_model():
    return {mode: fluxrt.FluxPipeline(**tiny_random_components(mode, device="cpu", full_width=False), compile=False,
                                      progress=False, mode=mode) for mode in ("text-to-image", "fill", "kontext")}


@pytest.mark.parametrize("model, kwargs, error, message", [
    ("kontext", dict(image=IMAGE, mask_image=MASK), ValueError, "mask_image= needs"),
    ("fill", dict(image=IMAGE), ValueError, "needs mask_image="),
    ("text-to-image", dict(control_image=IMAGE), ValueError, "control_image= needs"),
    ("text-to-image", dict(mask_image=MASK), ValueError, "pass image= too"),
    ("text-to-image", dict(image=IMAGE, strength=1.5), ValueError, r"strength must be a number in \[0, 1\]"),
    ("text-to-image", dict(image=IMAGE, max_area=4096), ValueError, "Kontext model's arguments"),
    ("text-to-image", dict(image="photo.png"), TypeError, "image"),
    ("text-to-image", dict(image=[IMAGE] * 3), ValueError, "got 3 images for 2 prompts"),
    ("text-to-image", dict(image=IMAGE, latents=torch.zeros(2, 12, 64)), TypeError, "latents= cannot be used"),
    ("text-to-image", dict(image=IMAGE, seed=None, generator=torch.Generator()), ValueError,
     "one torch.Generator per image"),
])
def test_mode_argument_errors_come_before_any_work(by_model, model, kwargs, error, message):
    pipe = by_model[model]
    calls = []
    hook = pipe.t5_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            pipe(PROMPTS, height=H, width=W, num_steps=2, **kwargs)
    finally:
        hook.remove()
    assert not calls, "an argument error must come before the text encoders run"


def test_from_pretrained_detects_the_mode_and_mode_is_checked(tmp_path):
    parts = tiny_random_components("fill", device="cpu", full_width=False)
    assert fluxrt.FluxPipeline(**parts, compile=False, progress=False).mode == "fill"
    with pytest.raises(ValueError, match="needs a transformer with 64 input channels"):
        fluxrt.FluxPipeline(**parts, compile=False, progress=False, mode="kontext")
    with pytest.raises(ValueError, match="mode must be one of"):
        fluxrt.FluxPipeline(**parts, compile=False, progress=False, mode="canny")


@torch.no_grad()
def test_serving_batches_each_mode_apart_and_matches_each_request_alone():
    """Text-to-image, img2img and inpainting requests mixed in one list: compatible ones share a batch (same mode
    and strength), each image is the one its request draws alone, and a bad image argument is that request's own
    error."""
    from fluxrt import GenerationRequest

    pipe = fluxrt.FluxPipeline(**tiny_random_components("text-to-image", device="cpu", full_width=False),
                               compile=False, progress=False)
    size = dict(width=W, height=H, num_steps=2)
    requests = [GenerationRequest("a red circle", seed=1, image=IMAGE, strength=0.7, **size),
                GenerationRequest("a blue square", seed=2, **size),
                GenerationRequest("a green star", seed=3, image=pil(5, W, H), strength=0.7, **size),
                GenerationRequest("a cat", seed=4, image=IMAGE, mask_image=MASK, **size),
                GenerationRequest("a dog", seed=5, image=IMAGE, strength=0.3, **size),
                GenerationRequest("a cow", seed=6, mask_image=MASK, **size),
                GenerationRequest("a fox", seed=7, control_image=IMAGE, **size)]
    sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["img"].shape[0]),
                                                      with_kwargs=True)
    try:
        results = pipe.generate(requests)
    finally:
        hook.remove()
    # transformer calls, batch by batch: the two img2img requests at strength 0.7 together (both steps kept:
    # diffusers' get_timesteps skips int(2 - 2 * 0.7) = 0), text-to-image (2 steps), inpainting at 0.6 (2 steps),
    # img2img at 0.3 (int(2 - 0.6) = 1 step skipped)
    assert sizes == [2, 2, 1, 1, 1, 1, 1], sizes
    for result in results[:5]:
        r = result.request
        assert result.ok, result.error
        extra = {k: v for k, v in (("image", r.image), ("mask_image", r.mask_image)) if v is not None}
        if r.image is not None:
            extra["strength"] = r.strength
        alone = pipe(r.prompt, seed=r.seed, **size, **extra)[0]
        assert np.abs(np.asarray(result.image, dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert "pass image= too" in results[5].error
    assert "control_image= needs" in results[6].error


def test_from_pretrained_reads_a_kontext_folder_as_kontext(tmp_path):
    """A diffusers folder whose model_index.json names FluxKontextPipeline loads as a Kontext model (a dev's
    shapes: only the folder tells), and its image= edits; the same folder as FluxPipeline is text-to-image."""
    import json
    import shutil

    from fluxrt.tiny import TRAINED

    folder = tmp_path / "kontext"
    shutil.copytree(TRAINED, folder)
    index = json.loads((folder / "model_index.json").read_text())
    plain = fluxrt.FluxPipeline.from_pretrained(folder, device="cpu", compile=False, progress=False)
    assert plain.mode == "text-to-image"
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    pipe = fluxrt.FluxPipeline.from_pretrained(folder, device="cpu", compile=False, progress=False)
    assert pipe.mode == "kontext"
    with pytest.raises(ValueError, match="strength= needs"):
        pipe("a star", image=IMAGE, strength=0.5)
    edited = pipe("a star", image=IMAGE, width=W, height=H, num_steps=1, max_area=W * H, _auto_resize=False,
                  output_type="pt")
    assert edited.shape == (1, 3, H, W)
