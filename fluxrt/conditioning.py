"""The image inputs of FLUX.1's tool modes, prepared exactly as diffusers' Flux pipelines prepare them.

Modes and the diffusers pipeline each one follows:
  img2img   FluxImg2ImgPipeline: start from the encoded image noised to the first kept timestep (`strength`).
  inpaint   FluxInpaintPipeline: img2img, and after every step the unmasked area is reset to the image noised to
            the next timestep (a text-to-image model; no extra channels).
  fill      FluxFillPipeline: 320 conditioning channels (masked-image latents 64 + the 8x8-packed mask 256) beside
            the 64 latent channels: a 384-channel transformer.
  control   FluxControlPipeline (Canny / Depth): the control image's latents (64) beside the latents: 128 channels.
  kontext   FluxKontextPipeline: the reference image's tokens appended to the sequence, position ids (1, row, col);
            only the generated tokens are read from the output.

call_mode says which of these a call runs (or refuses an argument the loaded model does not take).

Everything here is a short function the pipeline calls; tensors are "unpacked" latents [B, 16, h, w] or packed
tokens [B, L, C] (fluxrt.sampling.pack). Randomness follows diffusers draw for draw: the caller makes one CPU
torch.Generator per image (make_generators) and passes the same list to every function that takes one and to
fluxrt.sampling.noise_from_generators (the start noise), in diffusers' order (see each docstring), so a diffusers
pipeline given those generators gives the same latents.

Batches: a function given fewer conditioning images than images to make repeats each one for consecutive images
(repeat_interleave: one image for all, or one per prompt with images grouped by prompt). diffusers' img2img, inpaint,
Fill and Kontext tile instead ([a, b, a, b]); the two agree whenever there is one image, or one per image.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from . import sampling

log = logging.getLogger("fluxrt")

VAE_SCALE = 8  # FLUX's autoencoder downsamples 8x
SIZE_MULTIPLE = 2 * VAE_SCALE  # then 2x2 patches: diffusers' `vae_scale_factor * 2`
FILL_CHANNELS = 4 * sampling.LATENT_CHANNELS + VAE_SCALE * VAE_SCALE * 4  # 64 masked-image + 256 mask = 320

# FluxKontextPipeline's (width, height) pairs, the resolutions Kontext was trained at (diffusers 0.34+).
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
KONTEXT_MAX_AREA = 1024 ** 2

_IMAGE_TYPES = "a PIL image, a numpy array [H, W, C] / [B, H, W, C], a torch tensor [C, H, W] / [B, C, H, W], " \
               "or a list of one of these"


# ---- which mode a call runs ----

_MODEL_NAMES = {"text-to-image": "a text-to-image model (dev, schnell, Krea)", "fill": "a Fill model",
                "control": "a Canny/Depth model", "kontext": "a Kontext model"}
_TAKES = {  # model mode -> the image arguments a call may give it (diffusers' pipelines for that model)
    "text-to-image": ("image", "mask_image", "strength"), "fill": ("image", "mask_image", "strength"),
    "control": ("control_image",), "kontext": ("image",),
}
_NEEDS = {"fill": ("image", "mask_image"), "control": ("control_image",)}  # Kontext runs without an image too
_WANTS = {  # the models that take an argument
    "mask_image": "a text-to-image model (inpainting) or a Fill model", "control_image": "a Canny/Depth model",
    "strength": "a text-to-image or Fill model", "image": "a text-to-image, Fill or Kontext model",
}


def call_mode(model_mode: str, image=None, mask_image=None, control_image=None, strength=None) -> str:
    """What a call runs: "text-to-image", "img2img", "inpaint", "fill", "control" or "kontext", from the loaded
    model's mode (fluxrt.loading.MODES) and the image arguments given (None: not given). One ValueError for an
    argument the model does not take (a mask with a Kontext model), or one it needs and lacks."""
    values = dict(image=image, mask_image=mask_image, control_image=control_image, strength=strength)
    given = {name for name, value in values.items() if value is not None}
    refused = sorted(given - set(_TAKES[model_mode]))
    if refused:
        raise ValueError(f"{refused[0]}= needs {_WANTS[refused[0]]}; the loaded model is {_MODEL_NAMES[model_mode]}")
    missing = [name for name in _NEEDS.get(model_mode, ()) if name not in given]
    if missing:
        raise ValueError(f"{_MODEL_NAMES[model_mode]} needs {' and '.join(name + '=' for name in missing)}")
    if model_mode != "text-to-image":
        return model_mode
    if given and "image" not in given:
        raise ValueError(f"{sorted(given)[0]}= works on an image: pass image= too")
    return "inpaint" if "mask_image" in given else "img2img" if given else "text-to-image"


# ---- image inputs (VaeImageProcessor.preprocess) ----


def _as_list(image, what: str) -> list:
    """One image or a non-empty list of images of one kind (PIL, numpy or torch)."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError(f"{what} is an empty list; pass at least one image")
    kinds = {_kind(x, what) for x in images}
    if len(kinds) > 1:
        raise TypeError(f"{what} mixes {sorted(kinds)}; pass images of one kind")
    for x in images:
        shape = (x.height, x.width) if isinstance(x, PIL.Image.Image) else tuple(x.shape)
        if 0 in shape:
            raise ValueError(f"{what} is empty (size {shape}); pass an image with pixels")
    return images


def _kind(image, what: str) -> str:
    if isinstance(image, PIL.Image.Image):
        return "PIL"
    if isinstance(image, np.ndarray):
        return "numpy"
    if isinstance(image, Tensor):
        return "torch"
    raise TypeError(f"{what} must be {_IMAGE_TYPES}; got {type(image).__name__}")


def image_size(image, what: str = "image", mask: bool = False) -> tuple[int, int]:
    """(height, width) in pixels of the (first) image as given, before any resize. mask: a 3-dim array is a batch
    of [H, W] masks unless its last dim is 1 (diffusers' reading)."""
    first = _as_list(image, what)[0]
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if first.ndim not in (2, 3, 4):
        raise ValueError(f"{what} has {first.ndim} dims {tuple(first.shape)}; {_IMAGE_TYPES}")
    if isinstance(first, np.ndarray):  # [H, W], [H, W, C], [B, H, W, C]; masks also [B, H, W]
        if mask and first.ndim == 3 and first.shape[-1] in (3, 4):
            raise ValueError(f"{what} has shape {first.shape}, an RGB(A) array; pass a single-channel mask [H, W] "
                             "(or a PIL image, which is converted to grayscale)")
        batched = first.ndim == 4 or (mask and first.ndim == 3 and first.shape[-1] != 1)
        return tuple(first.shape[1:3]) if batched else tuple(first.shape[:2])
    return tuple(first.shape[-2:])  # [H, W], [C, H, W], [B, C, H, W]


def snapped_size(image, height: int | None = None, width: int | None = None, what: str = "image",
                 mask: bool = False) -> tuple[int, int]:
    """(height, width) rounded down to multiples of 16, the image's own where not given (get_default_height_width)."""
    own_height, own_width = image_size(image, what, mask)
    height = own_height if height is None else _positive_int(height, "height")
    width = own_width if width is None else _positive_int(width, "width")
    snapped = (height - height % SIZE_MULTIPLE, width - width % SIZE_MULTIPLE)
    if min(snapped) == 0:
        raise ValueError(f"{what}: a size of {height}x{width} pixels (height x width) is under {SIZE_MULTIPLE} pixels "
                         f"a side, FLUX's smallest (one latent token); pass a larger image or size")
    return snapped


def _positive_int(value, what: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _to_float(x: Tensor, what: str) -> Tensor:
    """float32 values: uint8 pixels 0..255 -> [0, 1] (diffusers would take them as 0..255 floats, which no one
    means), bool -> 0 / 1, other numbers as they are; NaN or inf refused."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or inf values; pass finite pixel values in [0, 1]")
    return x


def _cat(tensors: list[Tensor], what: str) -> Tensor:
    if len({t.shape[1:] for t in tensors}) > 1:
        raise ValueError(f"{what}: the images of a list must have one shape, got {[tuple(t.shape) for t in tensors]}")
    return torch.cat(tensors)


def _pil_batch(images: list, height: int, width: int, mode: str) -> Tensor:
    """PIL images -> [B, C, H, W] in [0, 1]: resized with Lanczos, then converted to `mode`, in diffusers' order
    (which a mask's RGB -> grayscale conversion makes visible)."""
    out = []
    for image in images:
        image = image.resize((width, height), resample=PIL.Image.Resampling.LANCZOS).convert(mode)
        out.append(np.array(image).astype(np.float32) / 255.0)
    array = np.stack(out)
    return torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2)


def _array_batch(images: list, what: str, channels_last: bool) -> Tensor:
    """numpy arrays / tensors (one image each or batches) -> one [B, C, H, W] tensor."""
    tensors = []
    for x in images:
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"{what} has shape {tuple(x.shape)}; {_IMAGE_TYPES}")
        tensors.append(_to_float(x.permute(0, 3, 1, 2) if channels_last else x, what))
    return _cat(tensors, what)


def preprocess_image(image, height: int | None = None, width: int | None = None, what: str = "image") -> Tensor:
    """Pixels [B, 3, H, W] float32 in [-1, 1], as FLUX pipelines' VaeImageProcessor.preprocess makes them.

    image: a PIL image (any mode; converted to RGB), a numpy array [H, W, 3] / [B, H, W, 3] or a tensor [3, H, W] /
    [B, 3, H, W] with values in [0, 1] (uint8 is read as 0..255), or a list of one kind (one size). Size: height /
    width, else the image's own, rounded down to multiples of 16; PIL images are resized with Lanczos, arrays and
    tensors with nearest-neighbour interpolation. An array or tensor that already holds negative values is taken to
    be in [-1, 1] and not normalized again (diffusers' rule, with its warning).
    """
    images = _as_list(image, what)
    height, width = snapped_size(images, height, width, what)
    if isinstance(images[0], PIL.Image.Image):
        pixels = _pil_batch(images, height, width, "RGB")
    else:
        pixels = _array_batch(images, what, channels_last=isinstance(images[0], np.ndarray))
        if pixels.shape[1] != 3:
            raise ValueError(f"{what} has {pixels.shape[1]} channels (shape {tuple(pixels.shape)}); pass RGB images: "
                             "[H, W, 3] arrays or [3, H, W] tensors")
        pixels = F.interpolate(pixels, size=(height, width))
        if pixels.min() < 0:
            log.warning("%s holds values in [%.3g, %.3g]: taken to be in [-1, 1] already and not normalized "
                        "(as diffusers); pass pixels in [0, 1]", what, float(pixels.min()), float(pixels.max()))
            return pixels
    return 2.0 * pixels - 1.0


def preprocess_mask(mask, height: int | None = None, width: int | None = None, what: str = "mask_image") -> Tensor:
    """A binary mask [B, 1, H, W] float32 (1: repaint, 0: keep), as FLUX pipelines' mask processor makes it.

    mask: a PIL image (resized with Lanczos, then converted to grayscale), a numpy array [H, W] / [H, W, 1] /
    [B, H, W] / [B, H, W, 1] or a tensor [H, W] / [B, H, W] / [B, 1, H, W] with values in [0, 1] (uint8: 0..255;
    resized nearest). Values >= 0.5 become 1, the rest 0. Size: as preprocess_image.
    """
    masks = _as_list(mask, what)
    height, width = snapped_size(masks, height, width, what, mask=True)
    if isinstance(masks[0], PIL.Image.Image):
        values = _pil_batch(masks, height, width, "L")
    else:
        values = F.interpolate(_mask_batch(masks, what), size=(height, width))
    return (values >= 0.5).float()


def _mask_batch(masks: list, what: str) -> Tensor:
    """numpy / torch masks -> [B, 1, H, W], reading a 3-dim input as diffusers does (a batch of [H, W] masks)."""
    if isinstance(masks[0], np.ndarray):
        masks = [m[..., 0] if m.ndim in (3, 4) and m.shape[-1] == 1 else m for m in masks]
        masks = [torch.from_numpy(np.ascontiguousarray(m)) for m in masks]
    masks = [m[None] if m.ndim == 2 else m for m in masks]
    masks = [m[:, None] if m.ndim == 3 else m for m in masks]
    for m in masks:
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"{what} has shape {tuple(m.shape)}; pass a single-channel mask ([H, W] or [B, 1, H, W])")
    return _cat([_to_float(m, what) for m in masks], what)


def check_mask_size(image, mask) -> None:
    """ValueError unless the mask has the image's size in pixels. diffusers never refuses a mask of another size (it
    resizes both to the output size); this is for callers that want the stricter rule (the CLI)."""
    image_hw, mask_hw = image_size(image, "image"), image_size(mask, "mask_image", mask=True)
    if image_hw != mask_hw:
        raise ValueError(f"the mask is {mask_hw[1]}x{mask_hw[0]} pixels but the image is {image_hw[1]}x{image_hw[0]} "
                         "(width x height); give a mask of the image's size")


def repeat_to_batch(x: Tensor, batch: int, what: str = "image") -> Tensor:
    """x [N, ...] -> [batch, ...], each row repeated for batch / N consecutive images."""
    if batch % x.shape[0]:
        raise ValueError(f"got {x.shape[0]} {what}s for {batch} images; pass one, or one per prompt")
    return x.repeat_interleave(batch // x.shape[0], dim=0)


# ---- randomness and the autoencoder ----


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: what a diffusers caller passes as `generator=[...]` for these seeds."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def encode_image(autoencoder, pixels: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Scaled latents (z - shift_factor) * scale_factor [B, 16, H/8, W/8] of pixels [B, 3, H, W] in [-1, 1].

    generators None: the posterior mean (diffusers' sample_mode="argmax": Kontext). Else a sample of the posterior,
    row b drawn from generators[b] (diffusers' retrieve_latents default: img2img, inpaint, Fill, Control), which
    advances that generator as diffusers does. autoencoder: fluxrt's AutoEncoder or FastAutoEncoder.
    """
    weight = next(autoencoder.parameters())
    moments = autoencoder.encode_moments(pixels.to(weight.device, weight.dtype))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    latents = mean
    if generators is not None:
        if len(generators) < mean.shape[0]:
            raise ValueError(f"{len(generators)} generators for {mean.shape[0]} images to encode; pass one per image")
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, dtype=mean.dtype)
                         for g in generators[: mean.shape[0]]])
        latents = mean + std * eps.to(mean.device)
    return (latents - autoencoder.shift_factor) * autoencoder.scale_factor


# ---- img2img ----


def strength_timesteps(timesteps: Sequence[float], strength: float) -> list[float]:
    """The tail of a schedule (num_steps + 1 values, 1 -> 0) that img2img runs for `strength` in [0, 1]
    (diffusers' get_timesteps: int(num_steps - num_steps * strength) steps are skipped)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    num_steps = len(timesteps) - 1
    init_timestep = min(num_steps * strength, num_steps)
    start = int(max(num_steps - init_timestep, 0))
    if num_steps - start < 1:
        raise ValueError(f"strength={strength} with {num_steps} steps leaves no step to run; raise strength or "
                         "the number of steps")
    return list(timesteps[start:])


def noised(latents: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """sigma * noise + (1 - sigma) * latents: the flow-matching forward process
    (FlowMatchEulerDiscreteScheduler.scale_noise)."""
    return sigma * noise + (1.0 - sigma) * latents


def img2img_start(image_latents: Tensor, noise: Tensor, timesteps: Sequence[float]) -> Tensor:
    """Packed start latents [B, L, 64]: the image's latents [B, 16, h, w] noised to the first kept timestep."""
    return sampling.pack(noised(image_latents, noise, timesteps[0]))


# ---- inpainting with a text-to-image model (FluxInpaintPipeline) ----


def inpaint_mask_latents(mask: Tensor, batch: int) -> Tensor:
    """Packed mask [batch, L, 64] (1: repaint): the pixel mask [N, 1, H, W] resized nearest to the latent grid."""
    rows, cols = mask.shape[-2] // SIZE_MULTIPLE, mask.shape[-1] // SIZE_MULTIPLE
    mask = F.interpolate(mask.float(), size=(2 * rows, 2 * cols))
    mask = repeat_to_batch(mask, batch, "mask").repeat(1, sampling.LATENT_CHANNELS, 1, 1)
    return sampling.pack(mask)


def inpaint_blend(latents: Tensor, image_latents: Tensor, noise: Tensor, mask: Tensor, sigma_next: float) -> Tensor:
    """After the step that reached timestep sigma_next: keep the latents where mask is 1, elsewhere the image's
    latents noised to sigma_next (at the last step, sigma 0: the image's latents themselves). All packed [B, L, 64]."""
    return (1 - mask) * noised(image_latents, noise, sigma_next) + mask * latents


# ---- Fill (FluxFillPipeline) ----


def fill_mask_tokens(mask: Tensor, batch: int) -> Tensor:
    """The pixel mask [N, 1, H, W] as tokens [batch, L, 256]: each 8x8 pixel block of a latent pixel becomes 64
    channels, then 2x2 latent patches are packed."""
    rows, cols = mask.shape[-2] // SIZE_MULTIPLE, mask.shape[-1] // SIZE_MULTIPLE
    mask = repeat_to_batch(mask.float(), batch, "mask")[:, 0]
    mask = mask.reshape(batch, 2 * rows, VAE_SCALE, 2 * cols, VAE_SCALE).permute(0, 2, 4, 1, 3)
    return sampling.pack(mask.reshape(batch, VAE_SCALE * VAE_SCALE, 2 * rows, 2 * cols))


def fill_conditioning(autoencoder, pixels: Tensor, mask: Tensor, batch: int,
                      generators: Sequence[torch.Generator]) -> Tensor:
    """Fill's conditioning tokens [batch, L, 320]: the masked image's latents (64) then the mask (256).

    pixels [N, 3, H, W] in [-1, 1] and mask [N or 1, 1, H, W] at the output size. The masked image is encoded by
    sampling, image n from generators[n]: diffusers draws this after the start noise (draw that first,
    sampling.noise_from_generators).
    """
    masked = pixels * (1 - mask)
    latents = repeat_to_batch(encode_image(autoencoder, masked, generators), batch)
    return torch.cat([sampling.pack(latents.float()), fill_mask_tokens(mask, batch)], dim=-1)


def channel_conditioned(model: Callable[..., Tensor], conditioning: Tensor) -> Callable[..., Tensor]:
    """`model` (BFL signature) with conditioning tokens [B, L, C] appended to its input channels each call (Fill:
    320, Control: 64), in the model's input dtype."""

    def conditioned(img: Tensor, *args, **kwargs) -> Tensor:
        return model(torch.cat([img, conditioning.to(img.dtype)], dim=-1), *args, **kwargs)

    return conditioned


# ---- Canny / Depth (FluxControlPipeline) ----


def control_conditioning(autoencoder, pixels: Tensor, batch: int, generators: Sequence[torch.Generator]) -> Tensor:
    """The control image's tokens [batch, L, 64]: pixels [N, 3, H, W] in [-1, 1] repeated to the batch, then encoded
    by sampling, row b from generators[b]: diffusers draws this before the start noise (call it before
    sampling.noise_from_generators). The control image is the user's Canny edges or depth map, as in diffusers.
    (diffusers' FluxControlPipeline passes a tensor control image to the VAE unprocessed, as if already in [-1, 1] at
    the output size; here every input goes through preprocess_image alike.)"""
    latents = encode_image(autoencoder, repeat_to_batch(pixels, batch, "control image"), generators)
    return sampling.pack(latents.float())


# ---- Kontext (FluxKontextPipeline) ----


def kontext_output_size(height: int, width: int, max_area: int = KONTEXT_MAX_AREA) -> tuple[int, int]:
    """The size Kontext generates for a requested height x width: the same aspect ratio over max_area pixels,
    rounded down to multiples of 16."""
    aspect = width / height
    width, height = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return height - height % SIZE_MULTIPLE, width - width % SIZE_MULTIPLE


def kontext_image_size(image, auto_resize: bool = True) -> tuple[int, int]:
    """(height, width) the reference image is resized to: the preferred Kontext resolution nearest its aspect ratio
    (auto_resize, diffusers' default), else its own size; multiples of 16."""
    height, width = snapped_size(image, what="image")
    if auto_resize:
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height, width


def kontext_reference(autoencoder, pixels: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """(tokens [batch, L', 64], position ids [batch, L', 3]) of the reference image pixels [N, 3, H', W'] in
    [-1, 1]: the posterior mean (no randomness), ids (1, row, col) so they are told apart from the generated
    image's (0, row, col)."""
    latents = repeat_to_batch(encode_image(autoencoder, pixels), batch)
    ids = sampling.prepare_img_ids(batch, pixels.shape[-2], pixels.shape[-1], device=latents.device)
    ids[..., 0] = 1
    return sampling.pack(latents.float()), ids


def sequence_conditioned(model: Callable[..., Tensor], tokens: Tensor, ids: Tensor) -> Callable[..., Tensor]:
    """`model` (BFL signature) with reference tokens [B, L', 64] and their ids [B, L', 3] appended to the image
    sequence each call; returns the velocity of the generated tokens only [B, L, C]."""

    def conditioned(img: Tensor, img_ids: Tensor, *args, **kwargs) -> Tensor:
        out = model(torch.cat([img, tokens.to(img.dtype)], dim=1), torch.cat([img_ids, ids.to(img_ids)], dim=1),
                    *args, **kwargs)
        return out[:, : img.shape[1]]

    return conditioned
