"""fluxrt.sampling against diffusers' FLUX pipeline: schedule, Euler loop, packing, position ids, noise."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from torch.testing import assert_close

from fluxrt.sampling import (
    denoise,
    get_noise,
    get_schedule,
    noise_from_generators,
    pack,
    prepare_img_ids,
    prepare_txt_ids,
    schedule_from_sigmas,
    true_cfg,
    unpack,
)
from fluxrt.validation import NonFiniteError

SEQ_LENS = [256, 1024, 3600, 4096, 4352, 8704, 16384]
STEPS = [1, 4, 28, 50]


def diffusers_scheduler(num_steps, image_seq_len, shift):
    """A scheduler set up exactly as FluxPipeline.__call__ does it (FLUX.1-dev config, or schnell's)."""
    if shift:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))
    retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return sched


@pytest.mark.parametrize("shift", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_schedule_matches_diffusers(seq_len, num_steps, shift):
    ours = torch.tensor(get_schedule(num_steps, seq_len, shift=shift), dtype=torch.float64)
    theirs = diffusers_scheduler(num_steps, seq_len, shift).sigmas.double()
    assert ours.shape == (num_steps + 1,)
    assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert ours[0].item() == 1.0 and ours[-1].item() == 0.0
    assert bool((ours[1:] < ours[:-1]).all())


def test_schedule_shift_depends_on_resolution():
    small, large = get_schedule(4, 256), get_schedule(4, 4096)
    assert large[1] > small[1] > get_schedule(4, 256, shift=False)[1] == 0.75


@pytest.mark.parametrize("num_steps", [0, -3])
def test_schedule_rejects_non_positive_steps(num_steps):
    with pytest.raises(ValueError):
        get_schedule(num_steps, 1024)


class VelocityField:
    """A fixed nonlinear velocity v(x, t) = tanh(x @ W) + sin(3t) * b that records what it was called with."""

    def __init__(self, channels, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=gen) / math.sqrt(channels)
        self.b = torch.randn(channels, generator=gen)
        self.calls = []

    def __call__(self, *, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        self.calls.append(dict(img_dtype=img.dtype, timesteps=timesteps.clone(), guidance=guidance, y=y))
        t = timesteps.float()[:, None, None]
        return (torch.tanh(img.float() @ self.w) + torch.sin(3 * t) * self.b).to(img.dtype)


def inputs(batch=2, height=48, width=80, seed=1):
    gen = torch.Generator().manual_seed(seed)
    img = pack(get_noise(batch, height, width, seed=seed))
    txt = torch.randn(batch, 7, 32, generator=gen)
    vec = torch.randn(batch, 12, generator=gen)
    return img, prepare_img_ids(batch, height, width), txt, prepare_txt_ids(batch, 7), vec


@pytest.mark.parametrize("shift, num_steps", [(True, 28), (True, 1), (False, 4)])
def test_denoise_matches_diffusers_euler(shift, num_steps):
    img, img_ids, txt, txt_ids, vec = inputs()
    model = VelocityField(img.shape[-1])
    calls = []
    ours = denoise(model, img, img_ids, txt, txt_ids, vec, get_schedule(num_steps, img.shape[1], shift=shift),
                   guidance=3.5, callback=lambda step, total: calls.append((step, total)))

    sched = diffusers_scheduler(num_steps, img.shape[1], shift)
    x = img.clone()
    for t in sched.timesteps:
        v = model(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=(t / 1000).expand(x.shape[0]),
                  y=vec, guidance=None)
        x = sched.step(v, t, x, return_dict=False)[0]

    assert ours.dtype == torch.float32
    assert_close(ours, x, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours, img)
    assert calls == [(i, num_steps) for i in range(1, num_steps + 1)]


def test_denoise_passes_timesteps_guidance_and_vec():
    img, img_ids, txt, txt_ids, vec = inputs(batch=3)
    timesteps = get_schedule(3, img.shape[1])
    model = VelocityField(img.shape[-1])
    denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=None)
    assert [c["guidance"] for c in model.calls] == [None, None, None]

    model = VelocityField(img.shape[-1])
    denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=4.0)
    assert len(model.calls) == 3
    for call, t in zip(model.calls, timesteps[:-1]):
        assert_close(call["guidance"], torch.full((3,), 4.0), atol=0, rtol=0)
        assert_close(call["timesteps"], torch.full((3,), t), atol=0, rtol=0)
        assert call["y"] is vec


@pytest.mark.parametrize("timesteps", [get_schedule(28, 4096), get_schedule(4, 1024, shift=False),
                                       [1.0, 0.93, 0.5, 0.41, 0.07, 0.0]])
def test_constant_velocity_moves_by_minus_v(timesteps):
    gen = torch.Generator().manual_seed(2)
    x0, v = torch.randn(2, 60, 64, generator=gen), torch.randn(2, 60, 64, generator=gen)
    out = denoise(lambda **kw: v, x0, None, None, None, None, timesteps)
    assert_close(out, x0 + (timesteps[-1] - timesteps[0]) * v, atol=2e-6, rtol=1e-6)
    assert_close(out, x0 - v, atol=2e-6, rtol=1e-6)


def test_denoise_bf16_keeps_dtype_and_accumulates_in_fp32():
    img, img_ids, txt, txt_ids, vec = inputs()
    timesteps = get_schedule(50, img.shape[1])
    model = VelocityField(img.shape[-1])
    out = denoise(model, img.bfloat16(), img_ids, txt, txt_ids, vec, timesteps, guidance=3.5)
    assert out.dtype == torch.bfloat16
    assert {c["img_dtype"] for c in model.calls} == {torch.bfloat16}
    ref = denoise(VelocityField(img.shape[-1]), img, img_ids, txt, txt_ids, vec, timesteps, guidance=3.5)
    assert_close(out.float(), ref, atol=0.1, rtol=0.05)

    # A constant bf16 velocity: an fp32 running latent lands within one bf16 ulp of x0 - v; rounding the
    # latent to bf16 every step (the bug this guards against) is off by up to ~8 ulps after 50 steps.
    gen = torch.Generator().manual_seed(3)
    x0, v = torch.randn(2, 60, 64, generator=gen).bfloat16(), torch.randn(2, 60, 64, generator=gen).bfloat16()
    out = denoise(lambda **kw: v, x0, None, None, None, None, timesteps)
    assert_close(out.float(), (x0.float() - v.float()).bfloat16().float(), atol=1e-5, rtol=2**-7)


@pytest.mark.parametrize("height, width", [(48, 80), (80, 48), (32, 32)])
def test_pack_unpack_match_diffusers(height, width):
    h, w = 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)
    latents = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(4))
    tokens = pack(latents)
    assert tokens.shape == (2, h * w // 4, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, h, w))
    assert torch.equal(unpack(tokens, height, width), latents)
    assert torch.equal(unpack(tokens, height, width), FluxPipeline._unpack_latents(tokens, height, width, 8))


@pytest.mark.parametrize("height, width", [(48, 80), (40, 72), (1024, 768)])
def test_position_ids_match_diffusers(height, width):
    rows, cols = math.ceil(height / 16), math.ceil(width / 16)
    ids = prepare_img_ids(3, height, width)
    expected = FluxPipeline._prepare_latent_image_ids(3, rows, cols, "cpu", torch.float32)
    assert ids.shape == (3, rows * cols, 3) and ids.dtype == torch.float32
    assert torch.equal(ids, expected.expand(3, -1, -1))
    # tokens line up with pack(): token k of a [.., 2*rows, 2*cols] latent sits at (row, col) = divmod(k, cols)
    assert torch.equal(ids[0, cols + 2], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(prepare_txt_ids(2, 5), torch.zeros(2, 5, 3))


@pytest.mark.parametrize("height, width", [(48, 80), (50, 70)])
def test_noise_shape_determinism_and_dtype(height, width):
    noise = get_noise(2, height, width, seed=7)
    assert noise.shape == (2, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    assert noise.dtype == torch.float32
    assert torch.equal(noise, get_noise(2, height, width, seed=7))
    assert not torch.equal(noise, get_noise(2, height, width, seed=8))
    assert not torch.equal(noise[0], noise[1])
    assert noise.abs().min() > 0 and 0.8 < noise.std().item() < 1.2
    assert torch.equal(get_noise(2, height, width, seed=7, dtype=torch.bfloat16), noise.bfloat16())


def test_noise_seed_list():
    seeds = [11, 5, 11]
    noise = get_noise(3, 48, 80, seed=seeds)
    for sample, s in zip(noise, seeds):
        assert torch.equal(sample, get_noise(1, 48, 80, seed=s)[0])
    assert not torch.equal(noise[0], noise[1])
    with pytest.raises(ValueError):
        get_noise(2, 48, 80, seed=[1, 2, 3])


def test_noise_accepts_numpy_integer_seeds():
    assert torch.equal(get_noise(2, 32, 48, seed=np.int64(3)), get_noise(2, 32, 48, seed=3))


class BlowsUpAt:
    """A velocity that is finite until step `step` (counting from 1), then `value` (inf or NaN) in one element."""

    def __init__(self, step: int, value: float):
        self.step, self.value, self.calls = step, value, 0

    def __call__(self, *, img, **kwargs):
        self.calls += 1
        v = torch.tanh(img.float())
        if self.calls >= self.step:
            v[-1, 0, 0] = self.value
        return v


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("bad_step", [1, 3])
def test_non_finite_latents_name_the_first_bad_step(bad_step, value):
    x0 = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    timesteps = get_schedule(5, x0.shape[1])
    steps = []
    with pytest.raises(NonFiniteError, match=f"NaN or inf after denoising step {bad_step} of 5"):
        denoise(BlowsUpAt(bad_step, value), x0, None, None, None, None, timesteps,
                callback=lambda step, total: steps.append(step))
    assert steps == [1, 2, 3, 4, 5]  # no per-step host sync: the loop runs to the end, then reports


def test_non_finite_check_can_be_turned_off():
    x0 = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    out = denoise(BlowsUpAt(2, float("nan")), x0, None, None, None, None, get_schedule(3, 6), check_finite=False)
    assert out[-1, 0, 0].isnan() and out[0].isfinite().all()


# ---- diffusers' sigmas, generators and callback_on_step_end (fluxrt.FluxPipeline's diffusers-named arguments) ----

CUSTOM_SIGMAS = [1.0, 0.83, 0.6, 0.41, 0.2, 0.07]


@pytest.mark.parametrize("shift", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 8704])
def test_schedule_from_sigmas_matches_diffusers(seq_len, shift):
    """Given sigmas, diffusers' scheduler shifts them as it shifts its own (dev: mu from the token count)."""
    sched = diffusers_scheduler(1, seq_len, shift)  # dev's or schnell's config, then set up with the sigmas
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(sched, None, "cpu", sigmas=CUSTOM_SIGMAS, mu=mu)
    ours = torch.tensor(schedule_from_sigmas(CUSTOM_SIGMAS, seq_len, shift=shift), dtype=torch.float64)
    assert_close(ours, sched.sigmas.double(), atol=1e-6, rtol=0)  # diffusers shifts in float32


def test_schedule_from_sigmas_is_get_schedule_for_its_own_sigmas():
    for shift in (True, False):
        sigmas = [1 - i / 7 for i in range(7)]
        assert schedule_from_sigmas(sigmas, 3600, shift=shift) == get_schedule(7, 3600, shift=shift)


@pytest.mark.parametrize("per_image", [False, True], ids=["one generator", "one per image"])
def test_generator_noise_is_diffusers_randn_tensor(per_image):
    from diffusers.utils.torch_utils import randn_tensor

    def generators():
        return [torch.Generator().manual_seed(s) for s in (5, 9)] if per_image else torch.Generator().manual_seed(5)

    theirs = randn_tensor((2, 16, 6, 10), generator=generators(), dtype=torch.float32)
    ours = noise_from_generators(2, 48, 80, generators(), torch.float32, "cpu")
    assert torch.equal(ours, theirs)
    if not per_image:  # one generator draws the batch at once: not the same as one seed per image
        assert not torch.equal(ours[1], get_noise(1, 48, 80, seed=5)[0])


def test_generator_noise_needs_one_generator_per_sample():
    with pytest.raises(ValueError, match="got 1 generators for 2 samples"):
        noise_from_generators(2, 32, 32, [torch.Generator()], torch.float32, "cpu")


def _hooked_run(hook, steps=3):
    """denoise with a toy model, on_step_end=hook: (output, what the model saw each step: (img, txt), txt given)."""
    x0 = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    txt = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    seen = []

    def model(*, img, txt, timesteps, **_):
        seen.append((img.clone(), txt.clone()))
        return img * 0.5 + txt.mean()

    out = denoise(model, x0, None, txt, None, None, get_schedule(steps, 6, shift=False), on_step_end=hook)
    return out, seen, txt


def test_on_step_end_sees_each_step_and_its_replacements_feed_the_next():
    calls = []

    def hook(index, t, tensors):
        calls.append((index, t, tensors["latents"].clone()))
        if index == 1:
            return {"latents": tensors["latents"] * 0.5, "prompt_embeds": tensors["prompt_embeds"] + 1}
        return None

    out, seen, txt = _hooked_run(hook)
    assert [(i, t) for i, t, _ in calls] == list(enumerate(get_schedule(3, 6, shift=False)[:-1]))
    plain, plain_seen, _ = _hooked_run(None)
    torch.testing.assert_close(calls[0][2], plain_seen[1][0], rtol=0, atol=0)  # the latents after step 0
    torch.testing.assert_close(seen[2][0], calls[1][2] * 0.5, rtol=0, atol=0)  # step 2 ran on the halved latents
    torch.testing.assert_close(seen[1][1], txt, rtol=0, atol=0)
    torch.testing.assert_close(seen[2][1], txt + 1, rtol=0, atol=0)  # and read the new prompt_embeds
    torch.testing.assert_close(out, calls[2][2], rtol=0, atol=0)  # no replacement at the last step: its latents out
    assert (out - plain).abs().max() > 1e-3


def test_on_step_end_can_edit_in_place():
    def hook(index, t, tensors):
        if index == 0:
            tensors["latents"].mul_(0.0)

    out, _, _ = _hooked_run(hook, steps=1)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("returned, error, message", [
    ([1], TypeError, "on_step_end must return a dict of tensors"),
    ({"noise": torch.zeros(1)}, ValueError, r"returned \['noise'\] at step index 0; it may return only"),
    ({"latents": torch.zeros(2, 6, 9)}, ValueError, r"latents returned at step index 0 must be a floating tensor of "
                                                     r"shape \(2, 6, 8\)"),
    ({"latents": torch.zeros(2, 6, 8, dtype=torch.int64)}, ValueError, "must be a floating tensor"),
    ({"prompt_embeds": "text"}, ValueError, "prompt_embeds returned at step index 0 must be a floating tensor"),
    ({"latents": torch.full((2, 6, 8), float("nan"))}, NonFiniteError, "latents returned at step index 0 hold NaN"),
])
def test_on_step_end_bad_returns_are_refused(returned, error, message):
    with pytest.raises(error, match=message):
        _hooked_run(lambda index, t, tensors: returned)


def test_true_cfg_negative_features_may_have_their_own_length():
    calls = []

    def model(*, txt, txt_ids, **_):
        calls.append((txt.shape[1], txt_ids.shape[1]))
        return torch.ones(1, 4, 8) * txt.shape[1]

    guided = true_cfg(model, torch.zeros(1, 5, 2), torch.zeros(1, 3), 2.0)
    out = guided(img=None, img_ids=None, txt=torch.zeros(1, 3, 2), txt_ids=torch.zeros(1, 3, 3), timesteps=None,
                 y=None)
    assert calls == [(3, 3), (5, 5)]  # each pass its own text length and matching position ids
    torch.testing.assert_close(out, torch.full((1, 4, 8), 5 + 2.0 * (3 - 5)))
