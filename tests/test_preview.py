"""fluxrt.preview: the fitted latent -> RGB projection against the full decode, its shapes and its cache.

The colour test uses the embedded trained tiny model (a random autoencoder decodes everything to near grey, where a
constant would do as well): its generated images' final latents, previewed, against the decoded images average-
pooled to the latent grid. Measured at 64x64: 16.4 dB (red circle on blue) and 21.3 dB (yellow triangle on black);
black scores 15.1 and 19.3 dB on them (the images are mostly dark), grey 7.7 dB, the fit images' mean colour 8.5 dB.
The bounds: above 14 dB and at least 1 dB above each constant."""

import pytest
import torch

from fluxrt import sampling
from fluxrt.pipeline import FluxPipeline
from fluxrt.preview import LatentPreview, synthetic_images
from fluxrt.tiny import TRAINED, tiny_random_pipeline

PSNR_BOUND_DB = 14.0
EARLY_PREVIEW_BOUND_DB = 17.0  # set after measuring: see test_an_early_preview_already_shows_the_image
PROMPTS = ("a red circle on a blue background", "a yellow triangle on black")


def psnr(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((got - expected) ** 2).mean()))


@pytest.fixture(scope="module")
def trained():
    return FluxPipeline.from_pretrained(TRAINED)


def final_latents(pipe, prompt: str) -> torch.Tensor:
    seen = {}

    def keep(pipe_, step, timestep, tensors):
        seen["latents"] = tensors["latents"].clone()
        return {}

    pipe([prompt], width=64, height=64, seed=3, callback_on_step_end=keep, progress=False)
    return seen["latents"]


def fit_mean_colour(pipe) -> torch.Tensor:
    """The mean decoded colour of the fit's images: the best constant preview the fit could have learnt."""
    with torch.inference_mode():
        decoded = pipe.autoencoder.decode(pipe.autoencoder.encode(synthetic_images() * 2 - 1))
    return (decoded / 2 + 0.5).clamp(0, 1).mean(dim=(0, 2, 3))[:, None, None]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_preview_shows_the_decoded_colours(trained, prompt):
    latents = final_latents(trained, prompt)
    with torch.inference_mode():
        pooled = torch.nn.functional.avg_pool2d(trained.decode(latents, 64, 64), 8)[0]
    preview = LatentPreview.of(trained.autoencoder).rgb(latents, 64, 64).permute(2, 0, 1).float() / 255
    score = psnr(preview, pooled)
    print(f"preview vs decode, {prompt!r}: {score:.1f} dB")
    assert score > PSNR_BOUND_DB, f"the preview is {score:.1f} dB from the decoded image, expected > {PSNR_BOUND_DB}"
    for name, constant in (("black", 0.0), ("grey", 0.5), ("the fit images' mean colour", fit_mean_colour(trained))):
        baseline = psnr(torch.as_tensor(constant).expand_as(preview), pooled)
        print(f"  {name}: {baseline:.1f} dB")
        assert score > baseline + 1, f"the preview ({score:.1f} dB) is no better than {name} ({baseline:.1f} dB)"


@pytest.mark.parametrize("height, width", [(48, 80), (16, 16), (112, 32)])
def test_shapes_for_odd_sizes(height, width):
    pipe = tiny_random_pipeline(progress=False)
    preview = LatentPreview.of(pipe.autoencoder)
    packed = sampling.pack(torch.randn(1, 16, height // 8, width // 8))
    rgb = preview.rgb(packed, height, width)
    assert rgb.shape == (height // 8, width // 8, 3) and rgb.dtype == torch.uint8, (rgb.shape, rgb.dtype)
    assert preview.image(rgb, height, width).size == (width, height)


def test_the_fit_is_cached_per_autoencoder(trained):
    first = LatentPreview.of(trained.autoencoder)
    assert LatentPreview.of(trained.autoencoder) is first, "a second preview of one autoencoder fitted again"
    other = LatentPreview.of(tiny_random_pipeline(progress=False).autoencoder)
    assert other is not first and not torch.equal(other.weight, first.weight), "two autoencoders share one fit"


def test_synthetic_images_are_seeded_and_in_range():
    images = synthetic_images()
    assert torch.equal(images, synthetic_images()), "the fit's images change from call to call"
    assert images.min() >= 0 and images.max() <= 1 and images.shape[1] == 3, (images.min(), images.max(), images.shape)


def test_a_projection_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[16, 3\] weight"):
        LatentPreview(torch.zeros(3, 16), torch.zeros(3))


def previews_of(pipe, prompt: str, steps: int) -> dict[int, torch.Tensor]:
    """{step: rgb in [0, 1]} of a step batcher's previews (every step but the last) of one 64x64 job."""
    from fluxrt import GenerationRequest
    from fluxrt.serve.batching import StepBatcher
    from fluxrt.serving import resolve

    seen = {}
    request = GenerationRequest(prompt=prompt, width=64, height=64, num_steps=steps, seed=3, preview_every=1,
                                on_preview=lambda step, total, rgb: seen.__setitem__(step, rgb.float() / 255))
    batcher = StepBatcher(pipe, max_batch=1)
    batcher.admit("job", resolve(pipe, request))
    while not batcher.step():
        pass
    return seen


def test_an_early_preview_already_shows_the_image(trained):
    """Previews show the denoised estimate x_t - t * velocity (ComfyUI previews x0), not the noisy latents: a quarter
    of the way in, the tiny model's preview is already near its last one. Measured at 12 steps, step 3 against step
    11: 21.1 and 21.7 dB for the two prompts; the noisy latents' projection there: 12.6 dB (the first prompt)."""
    for prompt in PROMPTS:
        previews = previews_of(trained, prompt, steps=12)
        score = psnr(previews[3], previews[11])
        print(f"preview at step 3 vs step 11, {prompt!r}: {score:.1f} dB")
        assert score > EARLY_PREVIEW_BOUND_DB, (f"the step-3 preview is {score:.1f} dB from the last one, expected > "
                                                f"{EARLY_PREVIEW_BOUND_DB}: previews should show the denoised estimate")
