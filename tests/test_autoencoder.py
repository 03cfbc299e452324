"""The reference FLUX autoencoder vs diffusers' AutoencoderKL with the same weights (converted by diffusers' own
LDM-VAE converter: BFL's ae.safetensors uses LDM names)."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from tiny_pipeline import diffusers_vae_twin as diffusers_twin

import fluxrt

from fluxrt.reference import AutoEncoder, AutoEncoderParams
from fluxrt.testing import randomize_parameters_, rel_error

# FLUX's structure (4 levels, 8x, z 16, one mid attention, GroupNorm(32)) at small widths
TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def test_flux_defaults_have_diffusers_flux_vae_shapes():
    with torch.device("meta"):
        ae = AutoEncoder()
        diffusers_twin(ae)  # loads strictly into diffusers' AutoencoderKL in FLUX's configuration: raises on any key/shape
    assert len(ae.decoder.up[0].block) == 3 and len(ae.encoder.down[0].block) == 2
    assert (ae.scale_factor, ae.shift_factor) == (0.3611, 0.1159)


@pytest.mark.parametrize("B, H, W", [(1, 64, 48), (2, 32, 32)])
@torch.no_grad()
def test_matches_diffusers(B, H, W):
    ae = randomize_parameters_(AutoEncoder(TINY_AE), seed=H + W, bias_std=0.02).eval()
    vae = diffusers_twin(ae)
    gen = torch.Generator().manual_seed(B)
    z = torch.randn(B, 16, H // 8, W // 8, generator=gen)
    image = ae.decode(z)
    expected = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert image.shape == (B, 3, H, W) and rel_error(image, expected) <= 1e-5
    x = torch.rand(B, 3, H, W, generator=gen) * 2 - 1
    mean = vae.encode(x).latent_dist.mean
    assert rel_error(ae.encode(x), (mean - vae.config.shift_factor) * vae.config.scaling_factor) <= 1e-5


def test_params_are_frozen_and_replaceable():
    p = dataclasses.replace(TINY_AE, z_channels=8)
    assert AutoEncoder(p).decoder.conv_in.in_channels == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ch = 64


# ---- load_autoencoder: BFL file, diffusers folder, all-in-one prefix; clear errors ----


@pytest.fixture()
def small_ae():
    return randomize_parameters_(AutoEncoder(TINY_AE), seed=5, bias_std=0.02).eval()


def assert_same_model(loaded, ae):
    assert loaded.params == ae.params
    sd = loaded.state_dict()
    assert sd.keys() == ae.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in ae.state_dict().items())


def test_load_bfl_file_and_prefixed_file(tmp_path, small_ae):
    save_file(small_ae.state_dict(), tmp_path / "ae.safetensors")
    assert_same_model(fluxrt.load_autoencoder(tmp_path / "ae.safetensors", dtype=torch.float32), small_ae)
    prefixed = {f"first_stage_model.{k}": v for k, v in small_ae.state_dict().items()}
    prefixed["model.diffusion_model.img_in.weight"] = torch.randn(4, 4)
    save_file(prefixed, tmp_path / "all-in-one.safetensors")
    assert_same_model(fluxrt.load_autoencoder(tmp_path / "all-in-one.safetensors", dtype=torch.float32), small_ae)


def test_load_diffusers_folder(tmp_path, small_ae):
    diffusers_twin(small_ae).save_pretrained(tmp_path / "vae")
    loaded = fluxrt.load_autoencoder(tmp_path, dtype=torch.float32)  # a pipeline folder: vae/ is found
    assert_same_model(loaded, small_ae)
    assert fluxrt.vae_bfl_to_diffusers(small_ae.state_dict()).keys() == diffusers_twin(small_ae).state_dict().keys()


def test_load_errors(tmp_path, small_ae):
    sd = dict(small_ae.state_dict())
    del sd["decoder.up.1.block.0.conv2.bias"]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(fluxrt.CheckpointError, match=r"missing keys: decoder\.up\.1\.block\.0\.conv2\.bias"):
        fluxrt.load_autoencoder(tmp_path / "missing.safetensors")
    save_file({"double_blocks.0.img_mod.lin.weight": torch.randn(4, 4)}, tmp_path / "flux.safetensors")
    with pytest.raises(fluxrt.CheckpointError, match="is a FLUX transformer checkpoint, not an autoencoder"):
        fluxrt.load_autoencoder(tmp_path / "flux.safetensors")
    save_file({"text_model.final_layer_norm.weight": torch.randn(4)}, tmp_path / "clip.safetensors")
    with pytest.raises(fluxrt.CheckpointError, match="unrecognized autoencoder layout.*final_layer_norm"):
        fluxrt.load_autoencoder(tmp_path / "clip.safetensors")
    sd = dict(small_ae.state_dict())
    sd["quant_conv.weight"] = torch.randn(32, 32, 1, 1)
    save_file(sd, tmp_path / "sd-vae.safetensors")
    with pytest.raises(fluxrt.CheckpointError, match="SD-style VAE"):
        fluxrt.load_autoencoder(tmp_path / "sd-vae.safetensors")
    with pytest.raises(FileNotFoundError):
        fluxrt.load_autoencoder(tmp_path / "nope.safetensors")
