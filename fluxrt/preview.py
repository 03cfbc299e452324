"""Cheap latent -> RGB previews of an image while it denoises (`fluxrt serve`'s streamed partial images).

    preview = LatentPreview.of(pipe.autoencoder)         # fitted once per autoencoder, then cached
    rgb = preview.rgb(packed_latents, height, width)      # uint8 [h, w, 3] on the CPU, one pixel per latent pixel
    rgb = preview.denoised_rgb(latents, velocity, t, height, width)  # what a denoising step shows (x_t - t * v)
    image = LatentPreview.image(rgb, height, width)       # PIL image of the requested size (nearest upsampling)

Where the projection comes from: as ComfyUI's latent previews, a linear map of each latent pixel's 16 channels to
RGB (a [16, 3] weight and a bias). fluxrt fits it per autoencoder by least squares, not from a published table, so
it holds for any autoencoder (the tiny random one of the tests as well as FLUX's): the autoencoder's own encoder
turns synthetic images (discs, squares and stripes on solid or gradient backgrounds) into latents of the kind it
makes, its decoder turns those back into images, and the fit maps each latent pixel to its decoded image
average-pooled to the latent grid (what the full decode would show there; for a trained autoencoder close to the
synthetic image itself). It runs once per autoencoder (one encoder and one decoder call on 48 images of 64x64) and
is cached while the autoencoder lives.

What a denoising step previews: the denoised estimate x0 = x_t - t * velocity (flow matching: x_t = (1 - t) x0 + t
noise, velocity = noise - x0), as ComfyUI previews x0 rather than the noisy latents, so a preview shows the image
from the first steps on. Its cost: one [L, 64] multiply-add, one [L, 16] x [16, 3] product on the latents' device (L latent pixels, 16384 at 1024x1024),
a copy of the [L, 3] bytes to the CPU, and, off the denoising thread, the nearest upsampling and PNG encode.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from . import sampling

FIT_SIZE = 64  # pixels; the synthetic images' side (8x8 latent pixels each)
LATENT_CHANNELS = 16


def synthetic_images(size: int = FIT_SIZE, count: int = 48, seed: int = 0) -> Tensor:
    """[count, 3, size, size] in [0, 1], seeded: a random solid colour or gradient background with a random-coloured
    disc, square or stripes on it (what the fit sees: flat regions and edges in many colours)."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    images = []
    for k in range(count):
        colours = torch.rand(3, 3, 1, 1, generator=generator)
        background = colours[0] if k % 2 else colours[0] * (1 - x) + colours[1] * x
        # centre in [0.2, 0.8], radius (or stripe width's term) in [0.1, 0.35]
        cx, cy, r = torch.rand(3, generator=generator) * torch.tensor([0.6, 0.6, 0.25]) + torch.tensor([0.2, 0.2, 0.1])
        shape = k % 3
        if shape == 0:
            inside = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        elif shape == 1:
            inside = ((x - cx).abs() < r) & ((y - cy).abs() < r)
        else:
            inside = ((x * (4 + 8 * r)).floor() % 2) == 1
        images.append(torch.where(inside, colours[2], background).expand(3, size, size))
    return torch.stack(images).contiguous()


class LatentPreview:
    """A fitted linear latent -> RGB map (see the module docstring)."""

    _fitted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, weight: Tensor, bias: Tensor):
        if weight.shape != (LATENT_CHANNELS, 3) or bias.shape != (3,):
            raise ValueError(f"a preview needs a [16, 3] weight and a [3] bias, got {tuple(weight.shape)} and "
                             f"{tuple(bias.shape)}")
        self.weight, self.bias = weight.float(), bias.float()
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def of(cls, autoencoder) -> "LatentPreview":
        """The projection fitted for `autoencoder` (fitted on first use, then cached while it lives)."""
        with cls._lock:
            preview = cls._fitted.get(autoencoder)
            if preview is None:
                preview = cls.fit(autoencoder)
                cls._fitted[autoencoder] = preview
            return preview

    @classmethod
    def fit(cls, autoencoder) -> "LatentPreview":
        """Least squares from the autoencoder's latents of synthetic_images() to their decoded images pooled to the
        latent grid."""
        images = synthetic_images()
        parameter = next(autoencoder.parameters())
        with torch.inference_mode():
            latents = autoencoder.encode((images * 2 - 1).to(parameter.device, parameter.dtype))
            decoded = (autoencoder.decode(latents).float().cpu() / 2 + 0.5).clamp(0, 1)  # as FluxPipeline.decode
            latents = latents.float().cpu()
        factor = decoded.shape[-1] // latents.shape[-1]
        pooled = torch.nn.functional.avg_pool2d(decoded, factor)
        features = latents.permute(0, 2, 3, 1).reshape(-1, LATENT_CHANNELS)
        features = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
        targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()
        solution = torch.linalg.lstsq(features, targets).solution.float()
        return cls(solution[:LATENT_CHANNELS], solution[LATENT_CHANNELS])

    def rgb(self, packed: Tensor, height: int, width: int) -> Tensor:
        """Packed latents [1, L, 64] (any float dtype, any device) of a height x width image -> uint8 [h, w, 3] on
        the CPU, h x w the latent grid (height / 8, width / 8)."""
        latents = sampling.unpack(packed[:1], height, width)[0]  # [16, h, w]
        weight, bias = self._on_device(latents.device)
        colours = torch.einsum("chw,cr->hwr", latents.float(), weight) + bias
        return (colours.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def denoised_rgb(self, latents: Tensor, velocity: Tensor, t: float, height: int, width: int) -> Tensor:
        """rgb() of the denoised estimate latents - t * velocity: the preview of a step that has reached time t
        (sigma) with the model's velocity prediction (packed [1, L, 64] each)."""
        return self.rgb(latents - t * velocity, height, width)

    @staticmethod
    def image(rgb: Tensor, height: int, width: int):
        """rgb's preview as a PIL image of height x width pixels (nearest upsampling of the latent grid)."""
        from PIL import Image

        return Image.fromarray(rgb.numpy(), "RGB").resize((width, height), Image.NEAREST)

    def _on_device(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self.weight.to(device), self.bias.to(device))
        return self._on[device]


def png_base64(image) -> str:
    """A PIL image as base64 PNG text: how `fluxrt serve` sends every image, previews and final ones alike."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
