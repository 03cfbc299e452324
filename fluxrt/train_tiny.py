"""Train the embedded `tiny` FLUX on fluxrt.shapes and write it as a diffusers-layout folder.

    python -m fluxrt.train_tiny --out fluxrt/weights/tiny        # ~30 min on a 2-core CPU, seeded

What it trains, with fluxrt's own reference modules:
1. an autoencoder of FLUX's VAE architecture (fluxrt.reference.AutoEncoder: 16 latent channels, 8x down, one mid
   attention, GroupNorm(32)) at small widths, on 64x64 shape images: L1 reconstruction of a posterior sample plus
   a small KL term; then FLUX's latent convention, scale_factor / shift_factor, from the latents' statistics
   (z_model = scale * (mean - shift) has zero mean and unit variance);
2. a FLUX.1 transformer (fluxrt.reference.Flux, the "tiny" preset's widths) schnell-style, i.e. without a guidance
   embedding: the rectified-flow objective (x_t = (1 - t) x0 + t noise, predict noise - x0, t logit-normal), each
   token's error weighted by how much object it covers (object_weights pooled over its 16x16 pixels: the objects,
   which the prompt is about, cover a few percent of the image), with 10 % of captions dropped to "" so that
   classifier-free guidance has an unconditional model; the weights shipped are an exponential moving average.

The text encoders are fluxrt.tiny's (real CLIP / T5 classes and tokenizers, fixed random weights, frozen); the
transformer learns from their features. Schnell-style without step distillation, the model wants more than
schnell's 4 steps, and true classifier-free guidance (a second pass with the empty prompt): the folder's
model_index.json records the sampling defaults fluxrt.FluxPipeline uses for it (SAMPLING_DEFAULTS: Euler steps, no
schedule shift, T5 length, true_cfg_scale with the empty negative prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import sampling, shapes
from .config import FluxConfig
from .convert import bfl_to_diffusers, vae_bfl_to_diffusers
from .pipeline import SAMPLING_KEY
from .reference import AutoEncoder, AutoEncoderParams, Flux
from .tiny import build_clip_encoder, build_clip_tokenizer, build_t5_encoder, build_t5_tokenizer

T5_LENGTH = 80  # every training caption fits in 73 T5 tokens of the tiny tokenizer
SAMPLING_DEFAULTS = {"num_steps": 20, "max_sequence_length": T5_LENGTH, "width": shapes.SIZE, "height": shapes.SIZE,
                     "true_cfg_scale": 3.0, "negative_prompt": ""}
CAPTION_DROPOUT = 0.1
LEARNING_RATE = 1e-3
EMA_DECAY = 0.999  # ~1000 steps averaged: smoother samples than the last step's weights
TOKEN_PIXELS = 16  # image pixels a side per transformer token: 8x autoencoder downsampling, 2x2 packing
OBJECT_WEIGHT = 10.0  # autoencoder loss weight of object pixels (object_weights)
KL_WEIGHT = 1e-5  # small: the latents only need to stay smooth; their scale is set afterwards (with_latent_scale)
AUTOENCODER = AutoEncoderParams(resolution=shapes.SIZE, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TRANSFORMER = dataclasses.replace(FluxConfig.preset("tiny"), guidance_embed=False)
STORAGE_DTYPE = torch.float16  # the shipped files: half the bytes, 10 mantissa bits


def _images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 renders [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def _log(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:7.1f} s] {message}", flush=True)


def object_weights(scenes: list[shapes.Scene], pixels: np.ndarray) -> torch.Tensor:
    """Per-pixel loss weights [N, 1, H, W]: OBJECT_WEIGHT where an object is drawn, 1 on the background. The objects
    cover a few percent of the pixels; unweighted, the autoencoder learns the backgrounds and blurs the shapes away."""
    masks = []
    backgrounds = {}
    for scene, image in zip(scenes, pixels):
        if scene.background not in backgrounds:
            backgrounds[scene.background] = shapes.render(shapes.Scene((), scene.background)).astype(np.int16)
        masks.append(np.abs(image.astype(np.int16) - backgrounds[scene.background]).max(axis=-1) > 8)
    return 1 + (OBJECT_WEIGHT - 1) * torch.from_numpy(np.stack(masks))[:, None].float()


def train_autoencoder(images: torch.Tensor, weights: torch.Tensor, steps: int, batch: int, seed: int,
                      start: float) -> AutoEncoder:
    torch.manual_seed(seed)
    ae = AutoEncoder(AUTOENCODER)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        index = torch.randint(len(images), (batch,), generator=gen)
        x, w = images[index], weights[index]
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn(mean.shape, generator=gen) * (0.5 * logvar).exp()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = ((ae.decoder(z) - x).abs() * w).mean() / w.mean() + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            _log(f"autoencoder step {step}/{steps}: loss {loss.item():.4f} (kl {kl.item():.3f})", start)
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def _latent_means(ae: AutoEncoder, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([ae.encoder(chunk).chunk(2, dim=1)[0] for chunk in images.split(256)])


def with_latent_scale(ae: AutoEncoder, images: torch.Tensor) -> AutoEncoder:
    """The autoencoder with FLUX's scale/shift set so that encode() gives latents of mean 0 and variance 1."""
    means = _latent_means(ae, images)
    shift, std = means.mean().item(), means.std().item()
    params = dataclasses.replace(AUTOENCODER, shift_factor=shift, scale_factor=1 / std)
    scaled = AutoEncoder(params)
    scaled.load_state_dict(ae.state_dict())
    return scaled.eval().requires_grad_(False)


class TextEncoders:
    """The frozen tiny CLIP + T5 (fluxrt.tiny) and their tokenizers, encoding captions as the pipeline does."""

    def __init__(self, folder: pathlib.Path, seed: int):
        self.clip_tokenizer = build_clip_tokenizer(folder / "tokenizer")
        self.t5_tokenizer = build_t5_tokenizer(folder / "tokenizer_2")
        self.clip = build_clip_encoder(self.clip_tokenizer, width=TRANSFORMER.vec_in_dim, seed=seed)
        self.t5 = build_t5_encoder(self.t5_tokenizer, width=TRANSFORMER.context_in_dim, seed=seed + 1)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t5_ids = self.t5_tokenizer(captions, padding="max_length", max_length=T5_LENGTH, truncation=True,
                                   return_tensors="pt").input_ids
        clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids
        return self.t5(t5_ids)[0], self.clip(clip_ids).pooler_output


def token_weights(pixel_weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights [N, 1, H, W] -> per-token [N, L]: the mean over each token's pixels (a token is a 2x2
    patch of latent pixels, each 8x8 image pixels), in the packed tokens' row-major order."""
    return F.avg_pool2d(pixel_weights, TOKEN_PIXELS).flatten(1)


def train_transformer(latents: torch.Tensor, weights: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                      empty: tuple, steps: int, batch: int, seed: int, start: float) -> Flux:
    """Rectified flow on packed latents [N, L, 64], each token's squared error weighted by weights [N, L], with
    per-image text features (txt [N, T, C], vec [N, V]). Returns the exponential moving average of the weights."""
    torch.manual_seed(seed)
    model = Flux(TRANSFORMER)
    average = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps,
                                                   pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    side = shapes.SIZE
    img_ids = sampling.prepare_img_ids(batch, side, side)
    txt_ids = sampling.prepare_txt_ids(batch, T5_LENGTH)
    empty_txt, empty_vec = empty
    for step in range(1, steps + 1):
        index = torch.randint(len(latents), (batch,), generator=gen)
        x0, w, t5, clip = latents[index], weights[index], txt[index], vec[index]
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        t5 = torch.where(drop[:, None, None], empty_txt, t5)
        clip = torch.where(drop[:, None], empty_vec, clip)
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal, as SD3 / FLUX train
        noise = torch.randn(x0.shape, generator=gen)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        error = (model(x_t, img_ids, t5, txt_ids, t, clip) - (noise - x0)).pow(2).mean(-1)  # [B, L]
        loss = (error * w).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        average.update_parameters(model)
        if step % 500 == 0 or step == steps:
            _log(f"transformer step {step}/{steps}: loss {loss.item():.4f}", start)
    return average.module.eval().requires_grad_(False)


def _autoencoder_config(params: AutoEncoderParams) -> dict:
    """diffusers' AutoencoderKL config for a FLUX-architecture autoencoder."""
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": params.in_channels, "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
        "act_fn": "silu", "latent_channels": params.z_channels, "norm_num_groups": params.norm_groups,
        "sample_size": params.resolution, "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True, "force_upcast": False,
    }


def _save_weights(tensors: dict, folder: pathlib.Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(STORAGE_DTYPE).contiguous() for k, v in tensors.items()}
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_pipeline(out: pathlib.Path, transformer: Flux, autoencoder: AutoEncoder, text: TextEncoders,
                  info: dict) -> None:
    """A diffusers FluxPipeline folder (model_index.json, transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/,
    scheduler/) that fluxrt.FluxPipeline.from_pretrained and diffusers both load."""
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(bfl_to_diffusers(transformer.state_dict()), out / "transformer",
                  {"_class_name": "FluxTransformer2DModel", **TRANSFORMER.to_diffusers()})
    _save_weights(vae_bfl_to_diffusers(autoencoder.state_dict()), out / "vae", _autoencoder_config(autoencoder.params))
    text.clip.to(STORAGE_DTYPE).save_pretrained(out / "text_encoder", safe_serialization=True)
    text.t5.to(STORAGE_DTYPE).save_pretrained(out / "text_encoder_2", safe_serialization=True)
    text.clip_tokenizer.save_pretrained(out / "tokenizer")
    text.t5_tokenizer.save_pretrained(out / "tokenizer_2")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": False}, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        SAMPLING_KEY: SAMPLING_DEFAULTS, "_fluxrt_training": info,
    }, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxrt.train_tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--images", type=int, default=20000, help="training scenes rendered")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=12000, help="transformer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (default: all cores); 1 when other work shares the cores, where threads "
                             "spinning at each op's barrier slow every step several-fold")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    scenes = shapes.sample_scenes(np.random.default_rng(args.seed), args.images, split="train")
    pixels = np.stack([shapes.render(s) for s in scenes])
    images = _images(pixels)
    _log(f"rendered {len(scenes)} training scenes", start)
    weights = object_weights(scenes, pixels)
    autoencoder = train_autoencoder(images, weights, args.vae_steps, batch=16, seed=args.seed + 1, start=start)
    autoencoder = with_latent_scale(autoencoder, images)
    with torch.no_grad():
        latents = torch.cat([sampling.pack(autoencoder.encode(chunk)) for chunk in images.split(256)])
        recon = torch.cat([autoencoder.decode(autoencoder.encode(chunk)) for chunk in images[:512].split(256)])
    psnr = -10 * math.log10(((recon.clamp(-1, 1) - images[:512]) / 2).pow(2).mean().item())
    _log(f"autoencoder PSNR {psnr:.1f} dB on 512 training images; latents {tuple(latents.shape)}", start)
    with tempfile.TemporaryDirectory() as folder:
        text = TextEncoders(pathlib.Path(folder), seed=args.seed)
    captions = [shapes.caption(s) for s in scenes]
    unique = sorted(set(captions))
    features = [text.encode(unique[i : i + 512]) for i in range(0, len(unique), 512)]
    t5_by, clip_by = torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features])
    row = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([row[c] for c in captions])
    _log(f"encoded {len(unique)} unique captions", start)
    transformer = train_transformer(latents, token_weights(weights), t5_by[index], clip_by[index], text.encode([""]),
                                    args.steps,
                                    batch=32, seed=args.seed + 2, start=start)
    info = {"seed": args.seed, "images": args.images, "vae_steps": args.vae_steps, "steps": args.steps,
            "autoencoder_psnr_db": round(psnr, 2), "minutes": round((time.monotonic() - start) / 60, 1)}
    save_pipeline(args.out, transformer, autoencoder, text, info)
    _log(f"wrote {args.out} ({info})", start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
