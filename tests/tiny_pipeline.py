"""A real, tiny, randomly initialised diffusers ``FluxPipeline``, built entirely offline.

Every component is the genuine class FLUX.1 uses (``CLIPTokenizer`` + ``CLIPTextModel``, ``T5TokenizerFast`` +
``T5EncoderModel``, ``AutoencoderKL``, ``FluxTransformer2DModel``, ``FlowMatchEulerDiscreteScheduler``), only tiny:

* the tokenizers and text encoders are fluxrt.tiny's (offline vocabularies, two-layer encoders);
* the transformer is exactly ``FluxConfig.preset("tiny").to_diffusers()``;
* the VAE has four blocks, so ``vae_scale_factor`` is 8 as in FLUX, and 16 latent channels.

Weights are deterministic in ``seed``; nothing touches the network.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from fluxrt import FluxConfig
from fluxrt.tiny import (
    TINY_AUTOENCODER,
    build_clip_encoder,
    build_clip_tokenizer,
    build_t5_encoder,
    build_t5_tokenizer,
)


def build_tiny_flux_pipeline(
    folder: pathlib.Path, guidance_embeds: bool = True, seed: int = 0, save: bool = False, fluxrt_vae: bool = False
) -> FluxPipeline:
    """Build a tiny random FluxPipeline under ``folder`` (tokenizer/, tokenizer_2/, and pipeline/ when ``save``).

    The transformer is ``FluxConfig.preset("tiny").to_diffusers()`` (hidden 128 = 2 heads x 64, context 64, vec 32)
    with ``guidance_embeds`` as given (True: FLUX.1-dev-like; False: schnell-like). All weights are float32, in eval
    mode, and depend only on ``seed``. Generate at heights/widths divisible by 16, e.g. 64x64.

    fluxrt_vae=True builds the VAE in fluxrt.tiny.TINY_AUTOENCODER's shape (GroupNorm(32), as fluxrt's AutoEncoder
    hard-codes) so that fluxrt.FluxPipeline can load this pipeline; the default VAE (4 groups, narrower) cannot.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    clip_tok = build_clip_tokenizer(folder / "tokenizer_src")
    clip_tok.save_pretrained(str(folder / "tokenizer"))
    t5_tok = build_t5_tokenizer(folder / "tokenizer_2_src")
    t5_tok.save_pretrained(str(folder / "tokenizer_2"))

    clip_model = build_clip_encoder(clip_tok, width=32, seed=seed)
    t5_model = build_t5_encoder(t5_tok, width=64, seed=seed + 1)

    torch.manual_seed(seed + 2)
    ae = TINY_AUTOENCODER
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        # 4 blocks -> vae_scale_factor 2**3 = 8
        block_out_channels=[ae.ch * m for m in ae.ch_mult] if fluxrt_vae else [8, 8, 16, 16],
        layers_per_block=ae.num_res_blocks if fluxrt_vae else 1,
        latent_channels=16,
        norm_num_groups=32 if fluxrt_vae else 4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )

    torch.manual_seed(seed + 3)
    transformer_config = FluxConfig.preset("tiny").to_diffusers()
    transformer_config["guidance_embeds"] = guidance_embeds
    transformer = FluxTransformer2DModel(**transformer_config)

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )

    for model in (clip_model, t5_model, vae, transformer):
        model.eval().requires_grad_(False)
        # float32 by construction (no .to(float32): diffusers warns about casting models that way)
        assert all(p.dtype == torch.float32 for p in model.parameters()), type(model).__name__

    pipe = FluxPipeline(
        scheduler=scheduler,
        text_encoder=clip_model,
        tokenizer=clip_tok,
        text_encoder_2=t5_model,
        tokenizer_2=t5_tok,
        vae=vae,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    if save:
        pipe.save_pretrained(str(folder / "pipeline"), safe_serialization=True)
    return pipe


def diffusers_vae_twin(ae) -> AutoencoderKL:
    """diffusers' AutoencoderKL holding a fluxrt.reference.AutoEncoder's weights, converted by diffusers' own LDM
    converter (so a test comparing the two checks fluxrt's key mapping against diffusers', not against itself)."""
    p = ae.params
    config = dict(
        in_channels=p.in_channels, out_channels=p.out_ch, latent_channels=p.z_channels,
        block_out_channels=[p.ch * m for m in p.ch_mult], layers_per_block=p.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * len(p.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(p.ch_mult),
        norm_num_groups=p.norm_groups, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor, sample_size=p.resolution,
    )
    vae = AutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(ae.state_dict()), config), strict=True)
    return vae
