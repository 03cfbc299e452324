"""fluxrt.compile: one call that accelerates a FLUX model, whichever of its five forms it comes in.

    fast = fluxrt.compile(obj, quantize=None, backend="auto", cuda_graphs="auto", attention="bf16")

obj                              what comes back (same call signature and return type as obj)
fluxrt.reference.Flux            fluxrt.transformer.FastFlux (the model's parameters reused, batched or quantized)
diffusers FluxTransformer2DModel fluxrt.diffusers_adapter.FastFluxTransformer (the diffusers model's tensors move)
fluxrt.reference.AutoEncoder     fluxrt.vae.FastAutoEncoder (the weights shared)
diffusers AutoencoderKL          fluxrt.vae.FastAutoencoderKL (the diffusers model's tensors move)
diffusers FluxPipeline           the same pipeline, its transformer and VAE replaced by the two above

Compile is atomic: the arguments and the whole conversion (keys, shapes, dtypes, devices, unknown modules and
parameters) are checked before any tensor moves, so a compile that raises leaves obj exactly as it was. For a
pipeline both conversions are checked before either moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from . import ops
from .devices import require_fp8_tensor_cores
from .diffusers_adapter import (
    FastFluxTransformer,
    check_flux_conversion,
    is_diffusers_flux,
    is_diffusers_flux_pipeline,
)
from .quantize import quantize as quantize_model
from .reference import AutoEncoder, Flux
from .transformer import FastFlux, check_compilable
from .vae import FastAutoEncoder, FastAutoencoderKL, check_autoencoder, is_diffusers_autoencoder_kl

log = logging.getLogger("fluxrt")

_COMPILED = (FastFlux, FastFluxTransformer, FastAutoEncoder, FastAutoencoderKL)


def compile(obj, quantize: str | None = None, backend: str = "auto", cuda_graphs="auto",
            attention: str = "bf16") -> nn.Module:
    """Accelerate a FLUX transformer, autoencoder or pipeline (the table in the module docstring).

    quantize: None | "fp8-weight" (FP8 weights, any GPU) | "fp8" (W8A8, sm_89+). The model is modified in place
    (its parameters are reused, batched or quantized, never duplicated): keep using the returned object.
    backend: "auto" | "triton" | "torch" (the autoencoder's ops are C++/CUDA: "triton" means "auto" there).
    cuda_graphs: "auto" (on for a CUDA model) | True | False. attention: "bf16" (the model's dtype) | "fp8" (e4m3
    q, k, v with per-(batch, head) scales, sm_89+; off by default: benchmarks/NOTES.md has its accuracy).
    quantize, cuda_graphs and attention apply to the transformer.
    """
    return prepare(obj, quantize=quantize, backend=backend, cuda_graphs=cuda_graphs, attention=attention)()


def prepare(obj, quantize: str | None = None, backend: str = "auto", cuda_graphs="auto",
            attention: str = "bf16") -> Callable[[], nn.Module]:
    """compile's check phase: every check compile(obj, ...) makes, with obj left untouched; returns the move phase,
    the call that converts and builds the compiled model. A caller compiling several models as one step (a
    pipeline's transformer and autoencoder) prepares all of them before building any."""
    _check_arguments(quantize, backend, cuda_graphs, attention)
    if is_diffusers_flux_pipeline(obj):
        # both conversions checked before either moves: a VAE that cannot convert leaves the transformer as it was
        build_transformer = _prepare_transformer(obj.transformer, quantize, backend, cuda_graphs, attention)
        build_vae = _prepare_autoencoder(obj.vae, backend)

        def build_pipeline():
            obj.transformer, obj.vae = build_transformer(), build_vae()
            return obj

        return build_pipeline
    if isinstance(obj, AutoEncoder) or is_diffusers_autoencoder_kl(obj):
        for name, value, default in (("quantize", quantize, None), ("attention", attention, "bf16")):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to the transformer; the autoencoder runs in its own dtype")
        return _prepare_autoencoder(obj, backend)
    return _prepare_transformer(obj, quantize, backend, cuda_graphs, attention)


def _check_arguments(quantize, backend, cuda_graphs, attention) -> None:
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if quantize not in (None, "fp8", "fp8-weight"):
        raise ValueError(f"quantize must be None, 'fp8' (W8A8) or 'fp8-weight', got {quantize!r}")
    if cuda_graphs not in ("auto", False, True):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if attention not in ("bf16", "fp8"):
        raise ValueError(f"attention must be 'bf16' or 'fp8', got {attention!r}")


def _refuse_compiled(obj, what: str) -> None:
    if isinstance(obj, _COMPILED):
        raise TypeError(f"{what} is already compiled by fluxrt ({type(obj).__name__}): use it as it is; to compile "
                        "with other options, compile the original model again")


def _prepare_transformer(obj, quantize, backend, cuda_graphs, attention) -> Callable[[], nn.Module]:
    """Check everything a transformer's compile needs; return the call that then converts and builds it."""
    _refuse_compiled(obj, "the transformer")
    if is_diffusers_flux(obj):
        convert = check_flux_conversion(obj)
        device = next(obj.parameters()).device
        config = obj.config
    elif isinstance(obj, Flux):
        check_compilable(obj, quantize)
        device = next(obj.parameters()).device
        convert, config = (lambda: obj), None
    else:
        raise TypeError(f"fluxrt.compile accepts a fluxrt.reference.Flux or AutoEncoder, a diffusers "
                        f"FluxTransformer2DModel, AutoencoderKL or FluxPipeline; got {type(obj).__name__}")
    if quantize == "fp8":
        require_fp8_tensor_cores(device, "quantize='fp8' (W8A8)", "use quantize='fp8-weight' (weight-only FP8)")
    if attention == "fp8":
        require_fp8_tensor_cores(device, "attention='fp8'", "use attention='bf16'")
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    graphs = device.type == "cuda" if cuda_graphs == "auto" else cuda_graphs

    def build() -> nn.Module:
        flux = convert()
        if quantize is not None:
            quantize_model(flux, backend=backend, activations="fp8" if quantize == "fp8" else "bf16")
        fast = FastFlux(flux, backend=backend, cuda_graphs=graphs, attention=attention)
        log.info("fluxrt.compile plan: %s", fast.plan)
        return fast if config is None else FastFluxTransformer(fast, config)

    return build


def _prepare_autoencoder(obj, backend) -> Callable[[], nn.Module]:
    _refuse_compiled(obj, "the autoencoder")
    return check_autoencoder(obj, backend)
