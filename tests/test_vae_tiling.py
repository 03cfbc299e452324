"""The compiled diffusers AutoencoderKL (fluxrt.vae.FastAutoencoderKL) follows diffusers' tiling and slicing
contract: untiled at any size until enable_tiling(), then diffusers' tiles, overlap and blending (decode and encode
match diffusers' tiled ones), disable_tiling() turns it off, settings made on the diffusers model before compile
are kept; enable_tiling(method="fluxrt") is the explicit option for fluxrt's own tiling.

A tiny VAE (8x, 16 latent channels, GroupNorm(4)) with diffusers' default tile sizes for sample_size 32: tiles of
4 latents (32 pixels) every 3, blended over 8 pixels, so small inputs already make several tiles, edge tiles
included."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL

import fluxrt
from fluxrt.testing import rel_error
from fluxrt.vae import FastAutoEncoder, FastAutoencoderKL

from test_autoencoder import diffusers_twin
from test_vae import small_ae


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
                         layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, sample_size=32,
                         use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                         shift_factor=0.1159).eval().requires_grad_(False)


def plain_and_compiled(seed: int = 0) -> tuple[AutoencoderKL, FastAutoencoderKL]:
    plain = tiny_vae(seed)
    return copy.deepcopy(plain), fluxrt.compile(plain)


def latents(b=2, h=10, w=7, seed=1) -> torch.Tensor:
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


def images(b=1, h=80, w=56, seed=2) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_pixels_close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


@torch.no_grad()
def test_untiled_by_default_at_any_size():
    """fluxrt used to tile a compiled AutoencoderKL by itself above a size: now only enable_tiling() tiles. The old
    automatic threshold (and fluxrt's tile size) set low on the object: still one untiled decode, like diffusers'."""
    plain, fast = plain_and_compiled()
    fast.fast.tile_latent, fast.fast.tile_overlap, fast.fast.tile_auto_pixels = 4, 1, 1
    z = latents()
    assert not fast.use_tiling and fast.plan["tiling"].startswith("off")
    assert_pixels_close(fast.decode(z).sample, plain.decode(z).sample, atol=1e-5)
    x = images()
    assert_pixels_close(fast.encode(x).latent_dist.mean, plain.encode(x).latent_dist.mean, atol=1e-5)


@torch.no_grad()
def test_tiled_decode_matches_diffusers():
    plain, fast = plain_and_compiled()
    z = latents()
    untiled = plain.decode(z).sample
    plain.enable_tiling()
    fast.enable_tiling()
    want = plain.decode(z).sample
    assert rel_error(want, untiled) > 1e-3  # tiling changes the image: the comparison below is of two tilings
    got = fast.decode(z)
    assert got.sample.shape == want.shape == (2, 3, 80, 56)
    assert_pixels_close(got.sample, want)
    (as_tuple,) = fast.decode(z, return_dict=False)
    assert torch.equal(as_tuple, got.sample)
    assert fast.plan["tiling"].startswith("diffusers'")


@pytest.mark.parametrize("h, w", [(80, 56), (40, 96)])
@torch.no_grad()
def test_tiled_encode_matches_diffusers(h, w):
    plain, fast = plain_and_compiled()
    x = images(b=2, h=h, w=w)
    untiled = plain.encode(x).latent_dist.mean
    plain.enable_tiling()
    fast.enable_tiling()
    want = plain.encode(x).latent_dist
    assert rel_error(want.mean, untiled) > 1e-3
    got = fast.encode(x).latent_dist
    assert got.mean.shape == want.mean.shape == (2, 16, h // 8, w // 8)
    assert_pixels_close(got.mean, want.mean)
    assert_pixels_close(got.std, want.std)


@torch.no_grad()
def test_disable_tiling_turns_it_off():
    plain, fast = plain_and_compiled()
    z = latents()
    want = plain.decode(z).sample
    fast.enable_tiling()
    assert rel_error(fast.decode(z).sample, want) > 1e-3
    fast.disable_tiling()
    assert not fast.use_tiling and fast.plan["tiling"].startswith("off")
    assert_pixels_close(fast.decode(z).sample, want, atol=1e-5)


@torch.no_grad()
def test_settings_made_before_compile_are_kept():
    """enable_tiling(), enable_slicing() and tile sizes set on the diffusers model carry over into the compiled one;
    changing the attributes on the compiled one works as on diffusers'."""
    plain = tiny_vae()
    plain.enable_tiling()
    plain.enable_slicing()
    plain.tile_sample_min_size, plain.tile_latent_min_size, plain.tile_overlap_factor = 40, 5, 0.375
    fast = fluxrt.compile(copy.deepcopy(plain))
    assert (fast.use_tiling, fast.use_slicing) == (True, True)
    assert (fast.tile_sample_min_size, fast.tile_latent_min_size, fast.tile_overlap_factor) == (40, 5, 0.375)
    z = latents(h=12, w=9)
    assert_pixels_close(fast.decode(z).sample, plain.decode(z).sample)
    for vae in (plain, fast):
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 24, 3, 0.5
    assert_pixels_close(fast.decode(z).sample, plain.decode(z).sample)


def recording_batches(run, batches: list):
    def recorded(tile: torch.Tensor) -> torch.Tensor:
        batches.append(tile.shape[0])
        return run(tile)

    return recorded


@torch.no_grad()
def test_slicing_runs_one_image_at_a_time_as_diffusers():
    plain, fast = plain_and_compiled()
    z, x = latents(b=3, h=5, w=4), images(b=3, h=24, w=32)
    batches = []
    for name in ("_decode_tile", "_encode_tile"):  # record the batch each real decoder / encoder call gets
        setattr(fast.fast, name, recording_batches(getattr(fast.fast, name), batches))
    fast.decode(z)
    fast.encode(x)
    assert batches == [3, 3]
    batches.clear()
    plain.enable_slicing()
    fast.enable_slicing()
    got_image, got_mean = fast.decode(z).sample, fast.encode(x).latent_dist.mean
    assert batches == [1] * 6
    assert_pixels_close(got_image, plain.decode(z).sample, atol=1e-5)
    assert_pixels_close(got_mean, plain.encode(x).latent_dist.mean, atol=1e-5)
    fast.disable_slicing()
    batches.clear()
    fast.decode(z)
    assert batches == [3]


@torch.no_grad()
def test_fluxrt_tiling_is_an_explicit_option():
    """enable_tiling(method="fluxrt") decodes with fluxrt's tiles and blending: what a compiled fluxrt
    AutoEncoder with the same weights decodes with tiling=True."""
    ae = small_ae(seed=5)
    twin = diffusers_twin(ae).requires_grad_(False)
    reference = FastAutoEncoder(copy.deepcopy(ae), tiling=True)
    fast = fluxrt.compile(copy.deepcopy(twin))
    for tiler in (reference, fast.fast):
        tiler.tile_latent, tiler.tile_overlap = 4, 2
    z = torch.randn(1, 16, 9, 7, generator=torch.Generator().manual_seed(3))
    fast.enable_tiling()
    diffusers_tiled = fast.decode(z).sample
    fast.enable_tiling(method="fluxrt")
    got = fast.decode(z).sample
    assert fast.plan["tiling"].startswith("fluxrt's")
    torch.testing.assert_close(got, reference.decode_unscaled(z), atol=1e-5, rtol=1e-5)
    assert rel_error(got, diffusers_tiled) > 1e-3
    assert rel_error(got, twin.decode(z).sample) > 1e-3  # tiled, not the untiled decode


def test_tiling_errors():
    _, fast = plain_and_compiled()
    with pytest.raises(ValueError, match=r"method must be one of \('diffusers', 'fluxrt'\)"):
        fast.enable_tiling(method="fast")
    assert not fast.use_tiling and fast.tiling_method == "diffusers"  # unchanged
    with pytest.raises(ValueError, match="tiling=False"):
        FastAutoencoderKL(FastAutoEncoder(small_ae()), fast.config)
    fast.enable_tiling()
    fast.tile_overlap_factor = 1.0  # diffusers' loop would step by 0
    with pytest.raises(ValueError, match="tile_overlap_factor 1.0 leave tiles no stride"):
        fast.decode(latents())
    with pytest.raises(ValueError, match="tile_overlap_factor 1.0 leave tiles no stride"):
        fast.encode(images())


@torch.no_grad()
def test_pipeline_vae_tiling_matches_diffusers(tmp_path):
    """pipe.vae.enable_tiling() on a diffusers FluxPipeline, then compile: the same tiled image."""
    from tiny_pipeline import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(tmp_path, seed=4)
    call = dict(prompt="a blue cube", height=64, width=48, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, output_type="pt")
    untiled = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.vae.enable_tiling()  # sample_size 32: tiles of 4 latents, so the 64x48 image (8x6 latents) is tiled
    want = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert rel_error(want, untiled) > 1e-3
    assert fluxrt.compile(pipe, backend="torch") is pipe
    assert pipe.vae.use_tiling
    got = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert_pixels_close(got, want)
