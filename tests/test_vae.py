"""The fast autoencoder (fluxrt.vae, via fluxrt.compile) vs the reference, its diffusers drop-in, fluxrt's tiled
decoding (diffusers' tiling contract of the compiled AutoencoderKL: tests/test_vae_tiling.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

import fluxrt
from fluxrt.reference import AutoEncoder, AutoEncoderParams
from fluxrt.testing import randomize_parameters_, rel_error
from fluxrt.vae import FastAutoEncoder, FastAutoencoderKL, _ramp, axis_tiles, tiled_decode

from test_autoencoder import diffusers_twin

# FLUX's structure (4 levels, 8x, z 16, mid attention) at small widths; 8 groups of 4-8 channels
SMALL = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)


def small_ae(seed: int = 0, dtype=torch.float32) -> AutoEncoder:
    torch.manual_seed(seed)
    return randomize_parameters_(AutoEncoder(SMALL), seed).to(dtype).requires_grad_(False).eval()


def latents(b=2, h=6, w=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, h, w, generator=g).to(dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_matches_reference_fp32(backend, channels_last):
    ref = small_ae()
    z = latents()
    images = torch.rand(2, 3, 40, 24) * 2 - 1
    want_decode, want_encode = ref.decode(z), ref.encode(images)
    fast = FastAutoEncoder(copy.deepcopy(ref), backend=backend, channels_last=channels_last)
    got = fast.decode(z)
    assert got.shape == (2, 3, 48, 40) and got.is_contiguous()
    assert rel_error(got, want_decode) <= 1e-5
    assert rel_error(fast.encode(images), want_encode) <= 1e-5
    assert rel_error(fast(images), ref(images)) <= 1e-5


def test_fast_bf16_within_the_rule():
    """bf16 fast decode vs the fp32 reference: no worse than 2x the reference's own bf16 error (DESIGN.md §4)."""
    ref32 = small_ae()
    z = latents(b=1, h=8, w=8)
    truth = ref32.decode(z)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    baseline = rel_error(ref16.decode(z.bfloat16()).float(), truth)
    fast = fluxrt.compile(copy.deepcopy(ref32).to(torch.bfloat16))
    err = rel_error(fast.decode(z.bfloat16()).float(), truth)
    assert err <= 2 * baseline + 1e-3, (err, baseline)


def test_compile_leaves_the_reference_module_intact():
    ref = small_ae()
    keys = list(ref.state_dict())
    ptrs = {n: p.data_ptr() for n, p in ref.named_parameters()}
    z = latents()
    before = ref.decode(z)
    fast = fluxrt.compile(ref)
    assert isinstance(fast, FastAutoEncoder) and fast.plan["ops"]["group_norm_silu"]
    assert list(ref.state_dict()) == keys  # the fused qkv conv is not registered
    assert {n: p.data_ptr() for n, p in ref.named_parameters()} == ptrs  # weights shared, not copied (NCHW on CPU)
    assert torch.equal(ref.decode(z), before)


def test_input_errors():
    fast = fluxrt.compile(small_ae())
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, H, W\]"):
        fast.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="autoencoder is torch.float32"):
        fast.decode(latents().double())
    with pytest.raises(ValueError, match="quantize='fp8' applies to the transformer"):
        fluxrt.compile(small_ae(), quantize="fp8")
    with pytest.raises(ValueError, match="attention='fp8' applies to the transformer"):
        fluxrt.compile(small_ae(), attention="fp8")
    with pytest.raises(ValueError, match="tiling must be"):
        FastAutoEncoder(small_ae(), tiling="always")
    fast = FastAutoEncoder(small_ae())
    with pytest.raises(ValueError, match="tiling must be"):
        fast.tiling = 1  # equal to True, but not a bool: refused, and the setting stays
    assert fast.tiling == "auto" and fast.plan["tiling"].startswith("auto")


def test_tiled_decode_blends_a_local_decoder_exactly():
    """With a decoder that has no global ops, tiling with ramps must reproduce the untiled output exactly."""
    weight = torch.randn(3, 16, 1, 1)

    def local(z):
        return F.interpolate(F.conv2d(z, weight), scale_factor=8, mode="nearest")

    z = latents(b=2, h=23, w=17)
    for tile, overlap in ((8, 3), (10, 0), (6, 2), (32, 4)):
        torch.testing.assert_close(tiled_decode(local, z, tile, overlap, upscale=8), local(z), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="overlap < tile"):
        tiled_decode(local, z, 8, 8, upscale=8)


def test_tiled_vs_untiled_autoencoder():
    """Tiles see their own GroupNorm statistics and attention, so tiled != untiled; the stated tolerance: relative
    error <= 0.05 on this random-weight model (a tile covers about half the image each way; 0.028 measured, 0.024 to
    0.044 over other seeds; 0.083 without the fade-out ramp), equal without tiling."""
    fast = FastAutoEncoder(small_ae())
    z = latents(b=1, h=24, w=20)
    untiled = fast.decode(z)
    fast.tile_latent, fast.tile_overlap = 16, 6
    fast.tiling = "auto"
    fast.tile_auto_pixels = 24 * 20  # not above: untiled
    assert torch.equal(fast.decode(z), untiled)
    fast.tile_auto_pixels = 24 * 20 - 1  # above: tiled automatically
    tiled = fast.decode(z)
    assert tiled.shape == untiled.shape
    err = rel_error(tiled, untiled)
    assert 0 < err <= 0.05, err
    fast.tiling = True
    assert torch.equal(fast.decode(z), tiled) and fast.plan["tiling"].startswith("on")
    fast.tiling = False  # never, even above the threshold
    assert torch.equal(fast.decode(z), untiled) and fast.plan["tiling"] == "off"


@pytest.mark.parametrize("fade_in, fade_out", [(True, False), (False, True), (True, True)])
def test_ramp_is_monotone_in_its_fade_zones(fade_in, fade_out):
    length, fade = 40, 12
    w = _ramp(length, fade, fade_in, fade_out, "cpu")
    assert w.shape == (length,) and (w > 0).all() and (w <= 1).all()
    rising, falling = w[:fade], w[length - fade :]
    if fade_in:
        assert (rising.diff() > 0).all() and rising[0] <= 1 / fade
    if fade_out:
        assert (falling.diff() < 0).all() and falling[-1] <= 1 / fade
    assert torch.equal(w[fade : length - fade], torch.ones(length - 2 * fade))


@pytest.mark.parametrize("upscale", [1, 8])
def test_neighbour_tiles_cross_fade_to_a_sum_of_one(upscale):
    """Tiles laid exactly `overlap` apart: over each overlap one tile's weight falls from ~1 to ~0 at its edge inside
    the neighbour while the neighbour's rises, and the raw weights sum to 1 along the whole axis (no seam, no step)."""
    tile, overlap = 16, 6
    size = 3 * tile - 2 * overlap  # three tiles, each overlapping the next by exactly `overlap`
    tiles = axis_tiles(size, tile, overlap, upscale, "cpu")
    assert [(start, length) for start, length, _ in tiles] == [(0, tile), (tile - overlap, tile), (size - tile, tile)]
    total = torch.zeros(size * upscale)
    for start, length, weights in tiles:
        total[start * upscale : (start + length) * upscale] += weights
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    fade = overlap * upscale
    for (_, _, left), (_, _, right) in zip(tiles, tiles[1:]):
        leaving, entering = left[-fade:], right[:fade]
        assert (leaving.diff() < 0).all() and (entering.diff() > 0).all()
        assert leaving[0] >= 1 - 1 / fade and leaving[-1] <= 1 / fade  # ~1 where the overlap starts, ~0 at its edge


def test_compiled_autoencoder_follows_a_dtype_change():
    """compile(ae).to(bf16) runs in bf16 (the fused q|k|v follows the weights) within the bf16 rule of the fp32
    truth; .to(fp64) matches the fp64 reference; an in-place weight write is seen too."""
    ref32 = small_ae(seed=4)
    z = latents(b=1, h=8, w=8, seed=5)
    truth = ref32.decode(z)
    fast = fluxrt.compile(copy.deepcopy(ref32))
    assert rel_error(fast.decode(z), truth) <= 1e-5  # the fused q|k|v is built, in fp32
    assert fast.to(torch.bfloat16) is fast
    baseline = rel_error(copy.deepcopy(ref32).to(torch.bfloat16).decode(z.bfloat16()).float(), truth)
    err = rel_error(fast.decode(z.bfloat16()).float(), truth)
    assert err <= 2 * baseline + 1e-3, (err, baseline)
    fast.to(torch.float64)
    ref64 = copy.deepcopy(fast.ae)  # the reference module on the same (bf16-rounded, now fp64) weights
    torch.testing.assert_close(fast.decode(z.double()), ref64.decode(z.double()), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        for ae in (fast.ae, ref64):
            ae.decoder.mid.attn_1.k.weight.mul_(1.5)
    torch.testing.assert_close(fast.decode(z.double()), ref64.decode(z.double()), rtol=1e-10, atol=1e-10)


def test_fp64_autoencoder_compiles_and_matches_the_reference():
    ref = small_ae(seed=6, dtype=torch.float64)
    z = latents(seed=7, dtype=torch.float64)
    fast = fluxrt.compile(ref)
    torch.testing.assert_close(fast.decode(z), ref.decode(z), rtol=1e-10, atol=1e-10)
    assert fast.plan["last_call"] == {"group_norm_silu": ["torch"], "add_group_norm_silu": ["torch"]}


@torch.no_grad()
def test_compiled_autoencoder_kl_follows_a_dtype_change():
    vae = _diffusers_vae(groups=4).requires_grad_(False)
    z = latents(b=1, h=6, w=4, seed=8)
    truth = vae.decode(z).sample
    baseline = rel_error(copy.deepcopy(vae).to(torch.bfloat16).decode(z.bfloat16()).sample.float(), truth)
    fast = fluxrt.compile(vae)
    fast.decode(z)  # built in fp32 first
    fast.to(torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    err = rel_error(fast.decode(z.bfloat16()).sample.float(), truth)
    assert err <= 2 * baseline + 1e-3, (err, baseline)


def test_slicing_decodes_images_one_by_one():
    fast = FastAutoEncoder(small_ae())
    z = latents(b=3)
    whole = fast.decode(z)
    fast.slicing = True
    torch.testing.assert_close(fast.decode(z), whole, rtol=1e-5, atol=1e-5)


def _diffusers_vae(groups: int = 8) -> AutoencoderKL:
    ae = small_ae(seed=3)
    if groups == ae.params.norm_groups:
        return diffusers_twin(ae)
    torch.manual_seed(3)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
                         layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=groups, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()


@pytest.mark.parametrize("groups", [8, 4])
def test_compile_diffusers_autoencoder_kl(groups):
    vae = _diffusers_vae(groups).requires_grad_(False)
    z = latents(b=2, h=6, w=4)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        want = vae.decode(z).sample
        want_mean = vae.encode(images).latent_dist.mean
        want_forward = vae(images).sample
    ptrs = {p.data_ptr() for p in vae.parameters()}
    config = vae.config
    fast = fluxrt.compile(vae)
    assert isinstance(fast, FastAutoencoderKL) and fast.config is config
    assert fast.dtype == torch.float32 and fast.device == torch.device("cpu")
    # weights moved, not copied: every fast parameter lives in a storage the diffusers model owned (the fused qkv
    # conv excepted: a new, small tensor), and the diffusers model is left empty
    fast_ptrs = {p.data_ptr() for p in fast.fast.ae.parameters()}
    assert fast_ptrs <= ptrs and all(p.numel() == 0 for p in vae.parameters())
    out = fast.decode(z)
    assert type(out).__name__ == "DecoderOutput" and rel_error(out.sample, want) <= 1e-5
    (tup,) = fast.decode(z, return_dict=False)
    assert torch.equal(tup, out.sample)
    assert rel_error(fast.encode(images).latent_dist.mean, want_mean) <= 1e-5
    assert rel_error(fast(images).sample, want_forward) <= 1e-5


def test_compile_rejects_a_non_flux_vae():
    vae = AutoencoderKL(latent_channels=4, block_out_channels=[8], norm_num_groups=4, layers_per_block=1)
    with pytest.raises(fluxrt.CheckpointError, match="latent_channels=4"):
        fluxrt.compile(vae)
    with pytest.raises(TypeError, match=r"fluxrt.compile accepts .*AutoencoderKL.*; got Conv2d"):
        fluxrt.compile(torch.nn.Conv2d(1, 1, 1))


# ---- GPU: the real FLUX autoencoder (random weights) at 1024^2 and 2048^2 ----


def _flux_ae_cuda(dtype):
    with torch.device("meta"):
        ae = AutoEncoder()
    return randomize_parameters_(ae.to(dtype).to_empty(device="cuda"), 0).requires_grad_(False).eval()


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_bf16_1024_decode_within_the_rule():
    ref32 = _flux_ae_cuda(torch.float32)
    z = torch.randn(1, 16, 128, 128, generator=torch.Generator().manual_seed(0)).cuda()
    truth = ref32.decode(z)
    baseline = rel_error(copy.deepcopy(ref32).to(torch.bfloat16).decode(z.bfloat16()).float(), truth)
    fast = fluxrt.compile(copy.deepcopy(ref32).to(torch.bfloat16))
    assert fast.channels_last and fast.plan["ops"]["group_norm_silu"] == "fluxrt._C (CUDA)"
    err = rel_error(fast.decode(z.bfloat16()).float(), truth)
    assert err <= 2 * baseline + 1e-3, (err, baseline)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_2048_decode_fits_24_gb():
    fast = fluxrt.compile(_flux_ae_cuda(torch.bfloat16))
    z = torch.randn(1, 16, 256, 256, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    image = fast.decode(z)
    assert image.shape == (1, 3, 2048, 2048) and torch.isfinite(image).all()
    assert torch.cuda.max_memory_allocated() < 24 * 2**30


@torch.no_grad()
def test_decode_and_encode_run_an_accelerate_hook_as_diffusers_does():
    """A pipeline calls vae.decode / encode, not forward: diffusers' AutoencoderKL runs an accelerate hook's
    pre_forward there (model CPU offload moves the VAE to the device in it); the compiled one must too, once each."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        def __init__(self):
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    plain = _diffusers_vae(groups=4).requires_grad_(False)
    fast = fluxrt.compile(copy.deepcopy(plain))
    z, images = latents(b=1, h=4, w=4), torch.rand(1, 3, 32, 32) * 2 - 1
    counts = []
    for vae in (plain, fast):
        hook = Counting()
        add_hook_to_module(vae, hook)
        vae.decode(z)
        vae.encode(images)
        counts.append(hook.calls)
    assert counts == [2, 2]
