"""fluxrt.conditioning (the image modes' inputs), fluxrt.loading.detect_mode and the tiny per-mode presets, each
against the diffusers pipeline's own methods (image processors, prepare_latents, prepare_mask_latents, prepare_image,
get_timesteps, the scheduler's step and scale_noise) on the same tiny components, seeds and images."""

import copy
import json

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift, retrieve_timesteps
from safetensors.torch import save_file
from tiny_pipeline import diffusers_vae_twin

import fluxrt
from fluxrt import conditioning as cond
from fluxrt import sampling
from fluxrt.convert import CheckpointError
from fluxrt.loading import MODES, detect_mode
from fluxrt.reference import AutoEncoder, Flux
from fluxrt.testing import randomize_parameters_, rel_error
from fluxrt.tiny import TINY_AUTOENCODER, TINY_RANDOM_MODELS, tiny_config, tiny_random_components, tiny_random_pipeline

FP32 = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(atol=0, rtol=0)
H, W = 48, 64  # output pixels: 3 x 4 tokens


# ---- components ----


@pytest.fixture(scope="module")
def autoencoders():
    """fluxrt's reference AutoEncoder and diffusers' AutoencoderKL holding the same random weights (diffusers' own
    LDM converter)."""
    ae = randomize_parameters_(AutoEncoder(TINY_AUTOENCODER), seed=7, bias_std=0.02).eval()
    vae = diffusers_vae_twin(ae)
    return ae, vae


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (fresh each time: get_timesteps sets its begin index)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def diffusers_pipeline(name: str, vae, transformer=None):
    """A diffusers Flux pipeline with only what its preparation methods use (no text encoders)."""
    return getattr(diffusers, name)(scheduler=scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def random_pil(seed: int, width: int, height: int, mode: str = "RGB") -> PIL.Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    gen = np.random.default_rng(seed)
    array = gen.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def random_pixels(seed: int, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def next_draws(generators) -> torch.Tensor:
    """One more draw from each generator: equal iff both sides consumed the same randomness."""
    return torch.stack([torch.randn(3, generator=g) for g in generators])


def start_noise(generators) -> torch.Tensor:
    """The start noise at the output size H x W, image b's from generators[b]."""
    return sampling.noise_from_generators(len(generators), H, W, generators, torch.float32, "cpu")


def start_schedule(num_steps: int, strength: float, seq_len: int):
    """(fluxrt's kept timesteps, diffusers' scheduler with its kept timesteps) for an img2img-style call."""
    kept = cond.strength_timesteps(sampling.get_schedule(num_steps, seq_len), strength)
    sched = scheduler()
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(sched, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return kept, sched


# ---- image inputs ----

IMAGE_INPUTS = {
    "pil": lambda: random_pil(0, 70, 52),
    "pil list": lambda: [random_pil(1, 70, 52), random_pil(2, 40, 90)],
    "numpy HWC": lambda: random_pixels(3, 37, 50, 3).numpy(),
    "numpy BHWC": lambda: random_pixels(4, 2, 37, 50, 3).numpy(),
    "tensor CHW": lambda: random_pixels(5, 3, 37, 50),
    "tensor BCHW": lambda: random_pixels(6, 2, 3, 40, 33),
    "tensor list": lambda: [random_pixels(7, 3, 40, 33), random_pixels(8, 3, 40, 33)],
    "tensor in [-1, 1]": lambda: random_pixels(9, 1, 3, 40, 33) * 2 - 1,
}


@pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor with value range in \\[-1,1\\]:FutureWarning")
@pytest.mark.parametrize("size", [(None, None), (H, W), (50, 81)])
@pytest.mark.parametrize("kind", IMAGE_INPUTS)
def test_preprocess_image_matches_diffusers(kind, size):
    image = IMAGE_INPUTS[kind]()
    processor = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16)
    expected = processor.preprocess(image, height=size[0], width=size[1]).float()
    out = cond.preprocess_image(image, *size)
    torch.testing.assert_close(out, expected, **EXACT)
    assert out.shape[-2] % 16 == 0 and out.shape[-1] % 16 == 0


def test_preprocess_reads_uint8_as_0_255_bool_and_int_masks_as_0_1_and_pil_as_rgb():
    array = (random_pixels(10, 32, 48, 3) * 255).round().to(torch.uint8).numpy()
    torch.testing.assert_close(cond.preprocess_image(array), cond.preprocess_image(array.astype(np.float32) / 255),
                               **EXACT)
    torch.testing.assert_close(cond.preprocess_image(torch.from_numpy(array).permute(2, 0, 1)),
                               cond.preprocess_image(array), **EXACT)
    mask = random_pixels(14, 32, 48) > 0.5
    torch.testing.assert_close(cond.preprocess_mask(mask.numpy()), cond.preprocess_mask(mask.long()), **EXACT)
    torch.testing.assert_close(cond.preprocess_mask(mask), cond.preprocess_mask(mask.float()), **EXACT)
    rgba = random_pil(11, 48, 32, "RGBA")
    torch.testing.assert_close(cond.preprocess_image(rgba), cond.preprocess_image(rgba.convert("RGB")), **EXACT)


def test_preprocess_image_warns_when_it_takes_pixels_as_normalized(caplog):
    pixels = random_pixels(12, 1, 3, 32, 32) * 2 - 1
    with caplog.at_level("WARNING", logger="fluxrt"):
        out = cond.preprocess_image(pixels)
    torch.testing.assert_close(out, pixels, **EXACT)
    assert "taken to be in [-1, 1] already" in caplog.text


def test_repeat_to_batch_repeats_each_image_for_consecutive_images():
    images = random_pixels(13, 2, 3, 16, 16)
    torch.testing.assert_close(cond.repeat_to_batch(images, 4), images[[0, 0, 1, 1]], **EXACT)
    with pytest.raises(ValueError, match="got 2 images for 3 images"):
        cond.repeat_to_batch(images, 3)


MASK_INPUTS = {
    "pil L": lambda: random_pil(20, 70, 52, "L"),
    "pil RGB": lambda: random_pil(21, 70, 52, "RGB"),
    "numpy HW": lambda: random_pixels(22, 37, 50).numpy(),
    "numpy HW1": lambda: random_pixels(23, 37, 50, 1).numpy(),
    "numpy BHW": lambda: random_pixels(24, 2, 37, 50).numpy(),
    "tensor HW": lambda: random_pixels(25, 37, 50),
    "tensor BHW": lambda: random_pixels(26, 2, 37, 50),
    "tensor B1HW": lambda: random_pixels(27, 2, 1, 37, 50),
    "tensor holding 0.5": lambda: (random_pixels(28, 1, 1, 32, 48) * 4).round() / 4,  # 0.5 binarizes to 1
}


@pytest.mark.parametrize("size", [(None, None), (H, W)])
@pytest.mark.parametrize("kind", MASK_INPUTS)
def test_preprocess_mask_matches_diffusers(kind, size):
    mask = MASK_INPUTS[kind]()
    processor = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    expected = processor.preprocess(mask, height=size[0], width=size[1]).float()
    out = cond.preprocess_mask(mask, *size)
    torch.testing.assert_close(out, expected, **EXACT)
    assert out.shape[1] == 1 and 0 < out.mean() < 1  # binary, both values present


@pytest.mark.parametrize("call, error, message", [
    (lambda: cond.preprocess_image("photo.png"), TypeError, "must be a PIL image.*got str"),
    (lambda: cond.preprocess_image(3), TypeError, "got int"),
    (lambda: cond.preprocess_image([]), ValueError, "empty list"),
    (lambda: cond.preprocess_image([random_pil(0, 32, 32), np.zeros((32, 32, 3))]), TypeError, "mixes"),
    (lambda: cond.preprocess_image(np.zeros((0, 32, 3))), ValueError, "is empty"),
    (lambda: cond.preprocess_image(PIL.Image.new("RGB", (0, 0))), ValueError, "is empty"),
    (lambda: cond.preprocess_image(np.zeros((8, 40, 3))), ValueError, "under 16 pixels"),
    (lambda: cond.preprocess_image(np.zeros((32, 32, 4))), ValueError, "4 channels.*RGB"),
    (lambda: cond.preprocess_image(np.zeros((32, 32))), ValueError, r"shape \(32, 32\)"),
    (lambda: cond.preprocess_image(np.zeros((32, 32, 3)), height=0), ValueError, "height must be a positive int"),
    (lambda: cond.preprocess_image([np.zeros((32, 32, 3)), np.zeros((48, 32, 3))]), ValueError, "one shape"),
    (lambda: cond.preprocess_mask(np.zeros((32, 32, 3))), ValueError, "RGB.*single-channel"),
    (lambda: cond.preprocess_mask(torch.zeros(1, 3, 32, 32)), ValueError, "single-channel"),
    (lambda: cond.preprocess_mask([torch.zeros(32, 32), torch.zeros(48, 32)]), ValueError, "one shape"),
    (lambda: cond.preprocess_image(torch.full((3, 32, 32), float("nan"))), ValueError, "NaN or inf"),
    (lambda: cond.preprocess_mask(np.full((32, 32), np.inf)), ValueError, "NaN or inf"),
    (lambda: cond.check_mask_size(random_pil(0, 64, 48), random_pil(0, 64, 64, "L")), ValueError,
     "mask is 64x64 pixels but the image is 64x48"),
])
def test_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_check_mask_size_accepts_the_image_size():
    cond.check_mask_size(random_pil(0, 64, 48), np.zeros((48, 64)))  # no error


# ---- which mode a call runs ----

IMAGE, MASK, CONTROL = "image", "mask", "control"


@pytest.mark.parametrize("model_mode, arguments, expected", [
    ("text-to-image", {}, "text-to-image"),
    ("text-to-image", dict(image=IMAGE), "img2img"),
    ("text-to-image", dict(image=IMAGE, strength=0.5), "img2img"),
    ("text-to-image", dict(image=IMAGE, mask_image=MASK), "inpaint"),
    ("fill", dict(image=IMAGE, mask_image=MASK), "fill"),
    ("fill", dict(image=IMAGE, mask_image=MASK, strength=0.9), "fill"),
    ("control", dict(control_image=CONTROL), "control"),
    ("kontext", dict(image=IMAGE), "kontext"),
    ("kontext", {}, "kontext"),
])
def test_call_mode(model_mode, arguments, expected):
    assert cond.call_mode(model_mode, **arguments) == expected


@pytest.mark.parametrize("model_mode, arguments, message", [
    ("kontext", dict(image=IMAGE, mask_image=MASK), "mask_image= needs a text-to-image model.*loaded model is a "
                                                    "Kontext model"),
    ("kontext", dict(strength=0.5), "strength= needs a text-to-image or Fill model"),
    ("text-to-image", dict(control_image=CONTROL), "control_image= needs a Canny/Depth model"),
    ("control", dict(image=IMAGE, control_image=CONTROL), "image= needs a text-to-image, Fill or Kontext model"),
    ("fill", dict(image=IMAGE), "a Fill model needs mask_image="),
    ("fill", {}, "a Fill model needs image= and mask_image="),
    ("control", {}, "a Canny/Depth model needs control_image="),
    ("text-to-image", dict(mask_image=MASK), "mask_image= works on an image: pass image= too"),
    ("text-to-image", dict(strength=0.3), "strength= works on an image"),
])
def test_call_mode_refuses_arguments_the_model_does_not_take(model_mode, arguments, message):
    with pytest.raises(ValueError, match=message):
        cond.call_mode(model_mode, **arguments)


# ---- the autoencoder ----


@torch.no_grad()
def test_encode_image_matches_diffusers(autoencoders):
    ae, vae = autoencoders
    pixels = random_pixels(30, 2, 3, 32, 48) * 2 - 1
    torch.testing.assert_close(cond.encode_image(ae, pixels), vae.encode(pixels).latent_dist.mode().sub(
        vae.config.shift_factor).mul(vae.config.scaling_factor), **FP32)
    ours, theirs = cond.make_generators([5, 6]), cond.make_generators([5, 6])
    expected = diffusers_pipeline("FluxImg2ImgPipeline", vae)._encode_vae_image(pixels, generator=theirs)
    sampled = cond.encode_image(ae, pixels, ours)
    torch.testing.assert_close(sampled, expected, **FP32)
    assert rel_error(sampled, cond.encode_image(ae, pixels)) > 1e-3  # a sample, not the mean
    torch.testing.assert_close(next_draws(ours), next_draws(theirs), **EXACT)
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        cond.encode_image(ae, pixels, ours[:1])
    fast = fluxrt.compile(copy.deepcopy(ae))  # FastAutoEncoder: the same encode_moments
    torch.testing.assert_close(cond.encode_image(fast, pixels, cond.make_generators([5, 6])), expected, **FP32)


@torch.no_grad()
def test_encode_image_clamps_logvar_as_diffusers(autoencoders):
    """A posterior whose log-variance exceeds diffusers' clamp (20): the sample's std is exp(10), not exp(20)."""
    ae, vae = copy.deepcopy(autoencoders[0]), copy.deepcopy(autoencoders[1])
    for conv in (ae.encoder.conv_out, vae.encoder.conv_out):
        conv.bias[16:] += 60
    pixels = random_pixels(31, 1, 3, 32, 32) * 2 - 1
    expected = diffusers_pipeline("FluxImg2ImgPipeline", vae)._encode_vae_image(pixels, cond.make_generators([1]))
    torch.testing.assert_close(cond.encode_image(ae, pixels, cond.make_generators([1])), expected, **FP32)


# ---- img2img ----


@pytest.mark.parametrize("num_steps, strength", [(4, 0.6), (7, 1.0), (10, 0.35), (28, 0.6)])
def test_strength_timesteps_match_get_timesteps(num_steps, strength):
    kept, sched = start_schedule(num_steps, strength, seq_len=12)
    pipe = diffusers_pipeline("FluxImg2ImgPipeline", None)
    pipe.scheduler = sched
    timesteps, steps = pipe.get_timesteps(num_steps, strength, "cpu")
    assert len(kept) - 1 == steps == len(timesteps)
    torch.testing.assert_close(torch.tensor(kept[:-1], dtype=torch.float64) * 1000, timesteps.double(), atol=1e-3,
                               rtol=0)
    assert kept[-1] == 0


@pytest.mark.parametrize("strength, message", [(1.5, r"in \[0, 1\]"), (-0.1, r"in \[0, 1\]"), (True, "number"),
                                               (0, "no step to run")])
def test_strength_errors(strength, message):
    with pytest.raises(ValueError, match=message):
        cond.strength_timesteps(sampling.get_schedule(4, 12), strength)


@torch.no_grad()
@pytest.mark.parametrize("batch, seeds", [(1, [3]), (2, [4, 9])])
def test_img2img_start_matches_prepare_latents(autoencoders, batch, seeds):
    ae, vae = autoencoders
    image = random_pil(40, 70, 52)
    kept, sched = start_schedule(5, 0.6, seq_len=12)
    pipe = diffusers_pipeline("FluxImg2ImgPipeline", vae)
    pipe.scheduler = sched
    timesteps, _ = pipe.get_timesteps(5, 0.6, "cpu")
    theirs, ours = cond.make_generators(seeds), cond.make_generators(seeds)
    init = pipe.image_processor.preprocess(image, height=H, width=W).float()
    expected, ids = pipe.prepare_latents(init, timesteps[:1].repeat(batch), batch, 16, H, W, torch.float32, "cpu",
                                         theirs)

    latents = cond.encode_image(ae, cond.preprocess_image(image, H, W), ours)
    noise = start_noise(ours)
    start = cond.img2img_start(cond.repeat_to_batch(latents, batch), noise, kept)
    torch.testing.assert_close(start, expected, **FP32)
    torch.testing.assert_close(next_draws(ours), next_draws(theirs), **EXACT)
    torch.testing.assert_close(sampling.prepare_img_ids(batch, H, W)[0], ids, **EXACT)


# ---- inpainting with a text-to-image model ----


@torch.no_grad()
def test_inpaint_mask_and_blending_match_flux_inpaint(autoencoders):
    ae, vae = autoencoders
    batch, seeds, num_steps, strength = 2, [11, 12], 4, 0.8
    image, mask = random_pil(50, 64, 48), random_pil(51, 64, 48, "L")
    kept, sched = start_schedule(num_steps, strength, seq_len=12)
    pipe = diffusers_pipeline("FluxInpaintPipeline", vae)
    pipe.scheduler = sched
    timesteps, _ = pipe.get_timesteps(num_steps, strength, "cpu")
    theirs, ours = cond.make_generators(seeds), cond.make_generators(seeds)
    init = pipe.image_processor.preprocess(image, height=H, width=W).float()
    latents, noise, image_latents, _ = pipe.prepare_latents(init, timesteps[:1].repeat(batch), batch, 16, H, W,
                                                            torch.float32, "cpu", theirs)
    mask_condition = pipe.mask_processor.preprocess(mask, height=H, width=W)
    mask_latents, _ = pipe.prepare_mask_latents(mask_condition, init * (mask_condition < 0.5), 1, 16, batch, H, W,
                                                torch.float32, "cpu", theirs)

    pixels, pixel_mask = cond.preprocess_image(image, H, W), cond.preprocess_mask(mask, H, W)
    encoded = cond.repeat_to_batch(cond.encode_image(ae, pixels, ours), batch)
    our_noise = start_noise(ours)
    x = cond.img2img_start(encoded, our_noise, kept)
    mask_tokens = cond.inpaint_mask_latents(pixel_mask, batch)
    torch.testing.assert_close(mask_tokens, mask_latents, **EXACT)
    torch.testing.assert_close(x, latents, **FP32)

    velocities = torch.randn(len(timesteps), *latents.shape, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(timesteps):  # FluxInpaintPipeline's loop after the transformer
        latents = sched.step(velocities[i], t, latents, return_dict=False)[0]
        proper = image_latents
        if i < len(timesteps) - 1:
            proper = sched.scale_noise(proper, torch.tensor([timesteps[i + 1]]), noise)
        latents = (1 - mask_latents) * proper + mask_latents * latents
        x = x + (kept[i + 1] - kept[i]) * velocities[i]
        x = cond.inpaint_blend(x, sampling.pack(encoded), sampling.pack(our_noise), mask_tokens, kept[i + 1])
        torch.testing.assert_close(x, latents, **FP32)
    kept_area = mask_tokens == 0
    torch.testing.assert_close(x[kept_area], sampling.pack(encoded)[kept_area], **EXACT)  # the image, unnoised


# ---- Fill ----


@torch.no_grad()
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_fill_conditioning_matches_flux_fill(autoencoders, strength):
    ae, vae = autoencoders
    batch, seeds, num_steps = 2, [21, 22], 4
    image, mask = random_pil(60, 64, 48), random_pil(61, 64, 48, "L")
    kept, sched = start_schedule(num_steps, strength, seq_len=12)
    pipe = diffusers_pipeline("FluxFillPipeline", vae)
    pipe.scheduler = sched
    timesteps, _ = pipe.get_timesteps(num_steps, strength, "cpu")
    theirs, ours = cond.make_generators(seeds), cond.make_generators(seeds)
    init = pipe.image_processor.preprocess(image, height=H, width=W).float()
    latents, _ = pipe.prepare_latents(init, timesteps[:1].repeat(batch), batch, 16, H, W, torch.float32, "cpu", theirs)
    mask_image = pipe.mask_processor.preprocess(mask, height=H, width=W)
    mask_tokens, masked_latents = pipe.prepare_mask_latents(mask_image, init * (1 - mask_image), 1, 16, batch, H, W,
                                                            torch.float32, "cpu", theirs)
    expected = torch.cat((masked_latents, mask_tokens), dim=-1)

    pixels, pixel_mask = cond.preprocess_image(image, H, W), cond.preprocess_mask(mask, H, W)
    encoded = cond.repeat_to_batch(cond.encode_image(ae, pixels, ours), batch)
    start = cond.img2img_start(encoded, start_noise(ours), kept)  # the start noise first, as diffusers
    conditioning = cond.fill_conditioning(ae, pixels, pixel_mask, batch, ours)
    assert conditioning.shape == (batch, 12, cond.FILL_CHANNELS) == (batch, 12, 320)
    torch.testing.assert_close(start, latents, **FP32)
    torch.testing.assert_close(conditioning[..., 64:], expected[..., 64:], **EXACT)  # the mask
    torch.testing.assert_close(conditioning, expected, **FP32)
    torch.testing.assert_close(next_draws(ours), next_draws(theirs), **EXACT)


# ---- Canny / Depth ----


@torch.no_grad()
def test_control_conditioning_matches_flux_control(autoencoders):
    ae, vae = autoencoders
    batch, seeds = 2, [31, 32]
    control = random_pil(70, 70, 52)
    pipe = diffusers_pipeline("FluxControlPipeline", vae)
    theirs, ours = cond.make_generators(seeds), cond.make_generators(seeds)
    image = pipe.prepare_image(control, W, H, batch, batch, "cpu", torch.float32)  # as __call__ passes them
    # FluxControlPipeline.__call__'s encoding, which comes before prepare_latents
    image = vae.encode(image).latent_dist.sample(generator=theirs)
    image = (image - vae.config.shift_factor) * vae.config.scaling_factor
    expected = pipe._pack_latents(image, batch, 16, *image.shape[2:])
    latents, _ = pipe.prepare_latents(batch, 16, H, W, torch.float32, "cpu", theirs)

    conditioning = cond.control_conditioning(ae, cond.preprocess_image(control, H, W), batch, ours)
    noise = start_noise(ours)
    torch.testing.assert_close(conditioning, expected, **FP32)
    torch.testing.assert_close(sampling.pack(noise), latents, **EXACT)
    torch.testing.assert_close(next_draws(ours), next_draws(theirs), **EXACT)


# ---- Kontext ----


class _Stop(Exception):
    pass


@pytest.mark.parametrize("image_size, size, auto_resize", [
    ((40, 100), (None, None), True), ((100, 40), (512, 768), True), ((64, 64), (1000, 333), True),
    ((51, 50), (None, None), True), ((70, 52), (None, None), False),
])
def test_kontext_sizes_match_flux_kontext(autoencoders, image_size, size, auto_resize):
    """The reference image's resize (preferred resolutions) and the output size, read at FluxKontextPipeline's
    prepare_latents (stopped there: nothing is encoded)."""
    image = random_pil(80, *image_size)
    cfg = tiny_config("kontext")
    pipe = diffusers_pipeline("FluxKontextPipeline", autoencoders[1], FluxTransformer2DModel(**cfg.to_diffusers()))
    seen = {}

    def stop(image, batch_size, num_channels_latents, height, width, *args, **kwargs):
        seen.update(image=image, height=height, width=width)
        raise _Stop

    pipe.prepare_latents = stop
    with pytest.raises(_Stop):
        pipe(image=image, prompt_embeds=torch.randn(1, 5, cfg.context_in_dim), pooled_prompt_embeds=torch.randn(1, 32),
             height=size[0], width=size[1], _auto_resize=auto_resize)
    height, width = cond.kontext_image_size(image, auto_resize)
    torch.testing.assert_close(cond.preprocess_image(image, height, width), seen["image"].float(), **EXACT)
    assert cond.kontext_output_size(size[0] or 1024, size[1] or 1024) == (seen["height"], seen["width"])
    if auto_resize:
        assert (width, height) in cond.PREFERRED_KONTEXT_RESOLUTIONS


@torch.no_grad()
def test_kontext_reference_matches_prepare_latents(autoencoders):
    ae, vae = autoencoders
    batch, seeds = 2, [41, 42]
    image = random_pil(90, 80, 48)
    pipe = diffusers_pipeline("FluxKontextPipeline", vae)
    theirs, ours = cond.make_generators(seeds), cond.make_generators(seeds)
    pixels = pipe.image_processor.preprocess(image, 48, 80)
    latents, image_latents, _, image_ids = pipe.prepare_latents(pixels, batch, 16, H, W, torch.float32, "cpu", theirs)

    tokens, ids = cond.kontext_reference(ae, cond.preprocess_image(image), batch)
    torch.testing.assert_close(tokens, image_latents, **FP32)
    assert ids.shape == (batch, 15, 3) and (ids[..., 0] == 1).all()
    torch.testing.assert_close(ids[1], image_ids, **EXACT)
    torch.testing.assert_close(sampling.pack(start_noise(ours)), latents, **EXACT)  # argmax: no draw
    torch.testing.assert_close(next_draws(ours), next_draws(theirs), **EXACT)


# ---- the conditioned transformers: fluxrt's reference and compiled Flux vs diffusers' ----


def transformer_inputs(cfg, batch: int, tokens: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, tokens, 64, generator=gen), img_ids=sampling.prepare_img_ids(batch, H, W),
                txt=torch.randn(batch, 5, cfg.context_in_dim, generator=gen),
                txt_ids=sampling.prepare_txt_ids(batch, 5),
                timesteps=torch.rand(batch, generator=gen), y=torch.randn(batch, cfg.vec_in_dim, generator=gen),
                guidance=torch.full((batch,), 3.5))


def run_diffusers(model, inputs: dict, hidden_states, img_ids) -> torch.Tensor:
    return model(hidden_states=hidden_states, encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                 timestep=inputs["timesteps"], img_ids=img_ids, txt_ids=inputs["txt_ids"][0],
                 guidance=inputs["guidance"], return_dict=False)[0]


def model_pair(mode: str, seed: int):
    """(reference Flux, fluxrt.compile'd copy, diffusers FluxTransformer2DModel) with the same random weights."""
    cfg = tiny_config(mode)
    ref = randomize_parameters_(Flux(cfg), seed).eval()
    dif = FluxTransformer2DModel(**cfg.to_diffusers()).eval()
    dif.load_state_dict(fluxrt.bfl_to_diffusers(ref.state_dict()), strict=True)
    fast = fluxrt.compile(copy.deepcopy(ref))
    assert type(fast).__name__ == "FastFlux"
    return ref, fast, dif


@torch.no_grad()
@pytest.mark.parametrize("mode", ["fill", "control"])
def test_channel_conditioned_models_match_diffusers(mode):
    ref, fast, dif = model_pair(mode, seed=len(mode))
    inputs = transformer_inputs(ref.params, batch=2, tokens=12, seed=1)
    extra = torch.randn(2, 12, ref.params.in_channels - 64, generator=torch.Generator().manual_seed(2))
    expected = run_diffusers(dif, inputs, torch.cat([inputs["img"], extra], dim=2), inputs["img_ids"][0])
    assert expected.shape == (2, 12, 64)
    for model in (ref, fast):
        out = cond.channel_conditioned(model, extra)(**inputs)
        assert rel_error(out, expected) <= 1e-5, (mode, type(model).__name__)


@torch.no_grad()
def test_sequence_conditioned_model_matches_diffusers_kontext():
    ref, fast, dif = model_pair("kontext", seed=3)
    inputs = transformer_inputs(ref.params, batch=2, tokens=12, seed=4)
    tokens = torch.randn(2, 15, 64, generator=torch.Generator().manual_seed(5))
    ids = sampling.prepare_img_ids(2, 48, 80)
    ids[..., 0] = 1
    # FluxKontextPipeline: latents then the image's tokens, ids concatenated the same way, generated tokens kept
    expected = run_diffusers(dif, inputs, torch.cat([inputs["img"], tokens], dim=1),
                             torch.cat([inputs["img_ids"][0], ids[0]], dim=0))[:, :12]
    for model in (ref, fast):
        out = cond.sequence_conditioned(model, tokens, ids)(**inputs)
        assert out.shape == (2, 12, 64) and rel_error(out, expected) <= 1e-5, type(model).__name__
    without = ref(**inputs)
    assert rel_error(without, expected) > 1e-2  # the reference tokens matter


# ---- mode detection ----


@pytest.mark.parametrize("mode", ["text-to-image", "fill", "control"])
def test_detect_mode_from_channels(mode):
    assert detect_mode(tiny_config(mode)) == mode


@pytest.mark.parametrize("in_channels, out_channels", [(96, 64), (64, 16), (384, 384)])
def test_detect_mode_refuses_unknown_channels(in_channels, out_channels):
    import dataclasses

    cfg = dataclasses.replace(tiny_config(), in_channels=in_channels, out_channels=out_channels)
    with pytest.raises(CheckpointError, match=f"{in_channels} input and {out_channels} output channels"):
        detect_mode(cfg)


def pipeline_folder(tmp_path, class_name: str):
    (tmp_path / "transformer").mkdir(parents=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return tmp_path


def test_detect_mode_kontext_by_folder_and_file_name(tmp_path):
    kontext = pipeline_folder(tmp_path / "kontext", "FluxKontextPipeline")
    dev = pipeline_folder(tmp_path / "dev", "FluxPipeline")
    cfg = tiny_config("kontext")
    for path in (kontext, kontext / "transformer", kontext / "transformer" / "diffusion_pytorch_model.safetensors"):
        assert detect_mode(cfg, path) == "kontext", path
    for path in (dev, dev / "transformer"):
        assert detect_mode(cfg, path) == "text-to-image", path
    bfl = tmp_path / "bfl"
    bfl.mkdir()
    for name in ("flux1-Kontext-dev.safetensors", "ae.safetensors"):
        (bfl / name).touch()
    assert detect_mode(cfg, bfl / "flux1-Kontext-dev.safetensors") == detect_mode(cfg, bfl) == "kontext"
    assert detect_mode(cfg, tmp_path / "flux1-krea-dev.safetensors") == "text-to-image"
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    (tmp_path / "outer" / "my-model").mkdir()
    assert detect_mode(cfg, tmp_path / "outer" / "my-model") == "text-to-image"  # not its transformer/ folder


@pytest.mark.parametrize("class_name, mode", [("FluxFillPipeline", "text-to-image"), ("FluxKontextPipeline", "fill"),
                                              ("FluxPipeline", "control")])
def test_detect_mode_refuses_a_folder_that_names_another_model(tmp_path, class_name, mode):
    folder = pipeline_folder(tmp_path, class_name)
    with pytest.raises(CheckpointError, match=f"names a {class_name}.*mixes two models"):
        detect_mode(tiny_config(mode), folder / "transformer")


@pytest.mark.parametrize("mode, name", [("fill", "flux1-fill-dev.safetensors"),
                                        ("control", "flux1-canny-dev.safetensors"),
                                        ("kontext", "flux1-kontext-dev.safetensors")])
def test_detect_mode_of_a_loaded_bfl_file(tmp_path, mode, name):
    weights = randomize_parameters_(Flux(tiny_config(mode)), seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / name))
    model = fluxrt.load_transformer(tmp_path / name, dtype=torch.float32)
    assert detect_mode(model.params, tmp_path / name) == mode
    assert MODES == ("text-to-image", "fill", "control", "kontext")


@pytest.mark.parametrize("mode, class_name", [("fill", "FluxFillPipeline"), ("control", "FluxControlPipeline"),
                                              ("kontext", "FluxKontextPipeline")])
def test_detect_mode_of_a_loaded_diffusers_folder(tmp_path, mode, class_name):
    torch.manual_seed(0)
    FluxTransformer2DModel(**tiny_config(mode).to_diffusers()).save_pretrained(str(tmp_path / "transformer"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    model = fluxrt.load_transformer(tmp_path, dtype=torch.float32)
    assert detect_mode(model.params, tmp_path) == mode


# ---- the tiny per-mode presets ----


@pytest.mark.parametrize("model, channels", [("tiny-random", 64), ("tiny-random-fill", 384),
                                             ("tiny-random-canny", 128), ("tiny-random-kontext", 64)])
def test_tiny_presets_per_mode(model, channels):
    mode = TINY_RANDOM_MODELS[model]
    cfg = tiny_config(mode)
    assert (cfg.in_channels, cfg.out_channels) == (channels, 64) and detect_mode(cfg) in (mode, "text-to-image")
    assert dataclass_without_channels(cfg) == dataclass_without_channels(fluxrt.FluxConfig.preset("tiny"))
    full = tiny_config(mode, full_width=True)
    assert full.in_channels == channels and full.hidden_size == 3072


def dataclass_without_channels(cfg):
    import dataclasses

    return dataclasses.replace(cfg, in_channels=1, out_channels=1)


def test_tiny_random_components_and_pipeline_per_mode():
    components = tiny_random_components("fill", device="cpu", full_width=False)
    assert components["transformer"].params.in_channels == 384
    assert components["autoencoder"].params == TINY_AUTOENCODER
    pipe = tiny_random_pipeline("cpu", mode="control", progress=False)
    assert pipe.transformer.params.in_channels == 128 and detect_mode(pipe.config) == "control"
    with pytest.raises(ValueError, match="mode must be one of"):
        tiny_random_pipeline("cpu", mode="canny")


# ---- the pieces composed as the pipeline composes them, vs each diffusers pipeline's whole call ----

RECIPE_PIPELINES = {  # mode -> (diffusers pipeline, the transformer's mode)
    "img2img": ("FluxImg2ImgPipeline", "text-to-image"), "inpaint": ("FluxInpaintPipeline", "text-to-image"),
    "fill": ("FluxFillPipeline", "fill"), "control": ("FluxControlPipeline", "control"),
    "kontext": ("FluxKontextPipeline", "kontext"),
}


def fluxrt_recipe(mode: str, model, ae, image, mask, generators, txt, vec, num_steps: int, strength: float):
    """Final packed latents from fluxrt's pieces and sampling.denoise: the wiring the pipeline is to follow."""
    batch, height, width = len(generators), H, W
    if mode == "kontext":
        height, width = cond.kontext_output_size(H, W, max_area=H * W)
    tokens = (height // 16) * (width // 16)
    timesteps, hook = sampling.get_schedule(num_steps, tokens), None
    if mode in ("img2img", "inpaint", "fill"):
        timesteps = cond.strength_timesteps(timesteps, strength)
        pixels = cond.preprocess_image(image, height, width)
        latents = cond.repeat_to_batch(cond.encode_image(ae, pixels, generators), batch)  # draws before the noise
        noise = sampling.noise_from_generators(batch, height, width, generators, torch.float32, "cpu")
        start = cond.img2img_start(latents, noise, timesteps)
        if mode == "fill":  # draws after the noise
            conditioning = cond.fill_conditioning(ae, pixels, cond.preprocess_mask(mask, height, width), batch,
                                                  generators)
            model = cond.channel_conditioned(model, conditioning)
        if mode == "inpaint":
            mask_tokens = cond.inpaint_mask_latents(cond.preprocess_mask(mask, height, width), batch)

            def hook(index, t, tensors):
                return {"latents": cond.inpaint_blend(tensors["latents"], sampling.pack(latents), sampling.pack(noise),
                                                      mask_tokens, timesteps[index + 1])}
    elif mode == "control":  # draws before the noise
        conditioning = cond.control_conditioning(ae, cond.preprocess_image(image, height, width), batch, generators)
        model = cond.channel_conditioned(model, conditioning)
        start = sampling.pack(sampling.noise_from_generators(batch, height, width, generators, torch.float32, "cpu"))
    else:  # kontext: the mean, no draw
        reference = cond.preprocess_image(image, *cond.kontext_image_size(image, auto_resize=False))
        model = cond.sequence_conditioned(model, *cond.kontext_reference(ae, reference, batch))
        start = sampling.pack(sampling.noise_from_generators(batch, height, width, generators, torch.float32, "cpu"))
    txt, vec = txt.expand(batch, -1, -1), vec.expand(batch, -1)
    return sampling.denoise(model, start, sampling.prepare_img_ids(batch, height, width), txt,
                            sampling.prepare_txt_ids(batch, txt.shape[1]), vec, timesteps, guidance=3.5,
                            on_step_end=hook)


@torch.no_grad()
@pytest.mark.parametrize("mode", RECIPE_PIPELINES)
def test_recipe_matches_the_diffusers_pipeline(autoencoders, mode):
    """Each mode's pieces, run by fluxrt.sampling.denoise with the reference transformer, end on the latents the
    diffusers pipeline's own __call__ ends on (same weights, images, generator seeds; output_type="latent")."""
    ae, vae = autoencoders
    name, transformer_mode = RECIPE_PIPELINES[mode]
    ref, _, dif = model_pair(transformer_mode, seed=8)
    image, mask, seeds = random_pil(100, 70, 52), random_pil(101, 64, 48, "L"), [61, 62]
    gen = torch.Generator().manual_seed(9)
    txt, vec = torch.randn(1, 6, ref.params.context_in_dim, generator=gen), torch.randn(1, 32, generator=gen)
    call = dict(prompt_embeds=txt, pooled_prompt_embeds=vec, num_images_per_prompt=2, height=H, width=W,
                num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                generator=cond.make_generators(seeds))
    call.update({"img2img": dict(image=image, strength=0.7),
                 "inpaint": dict(image=image, mask_image=mask, strength=0.7),
                 "fill": dict(image=image, mask_image=mask), "control": dict(control_image=image),
                 "kontext": dict(image=image, _auto_resize=False, max_area=H * W)}[mode])
    expected = diffusers_pipeline(name, vae, dif)(**call).images
    out = fluxrt_recipe(mode, ref, ae, image, mask, cond.make_generators(seeds), txt, vec, 3,
                        0.7 if mode in ("img2img", "inpaint") else 1.0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
