"""fluxrt.compile: one call that accelerates a FLUX model, whichever of its forms it comes in.

    fast = fluxrt.compile(obj, quantize=None, backend="auto", cuda_graphs="auto", attention="bf16",
                          parallel=None, ulysses_degree=None, cache=None)

obj                              what comes back (same call signature and return type as obj)
fluxrt.reference.Flux            fluxrt.transformer.FastFlux (the model's parameters reused, batched or quantized)
diffusers FluxTransformer2DModel fluxrt.diffusers_adapter.FastFluxTransformer (the diffusers model's tensors move;
                                 peft LoRA adapters loaded into it run as side branches: fluxrt.diffusers_lora)
fluxrt.reference.AutoEncoder     fluxrt.vae.FastAutoEncoder (the weights shared)
diffusers AutoencoderKL          fluxrt.vae.FastAutoencoderKL (the diffusers model's tensors move)
diffusers FluxControlNetModel    fluxrt.controlnet.FastFluxControlNetModel (its trunk's tensors move)
diffusers FluxMultiControlNetModel  the same object, each of its nets replaced by a FastFluxControlNetModel
a diffusers FLUX pipeline        the same pipeline, its transformer, VAE and (if it has one) controlnet replaced by
                                 the above. A FLUX pipeline is known by its components, not its class: a
                                 FluxTransformer2DModel transformer and an AutoencoderKL vae (FluxPipeline, Img2Img,
                                 Inpaint, Fill, Control*, ControlNet*, Kontext*, and later ones of that shape).

Compile is atomic: the arguments and the whole conversion (keys, shapes, dtypes, devices, unknown modules and
parameters) are checked before any tensor moves, so a compile that raises leaves obj exactly as it was. For a
pipeline every component's conversion is checked before any moves.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from torch import nn

from . import ops
from .devices import require_fp8_tensor_cores
from .diffusers_adapter import (
    FastFluxTransformer,
    check_flux_conversion,
    is_diffusers_controlnet,
    is_diffusers_flux,
    is_diffusers_multi_controlnet,
    is_diffusers_pipeline,
)
from .cache import parse as parse_cache
from .diffusers_state import compile_step_cache, keep_model_offload
from .quantize import quantize as quantize_model
from .reference import AutoEncoder, Flux
from .transformer import FastFlux, check_compilable
from .vae import FastAutoEncoder, FastAutoencoderKL, check_autoencoder, is_diffusers_autoencoder_kl

log = logging.getLogger("fluxrt")

_COMPILED = (FastFlux, FastFluxTransformer, FastAutoEncoder, FastAutoencoderKL)
_FLUX_PIPELINES = ("FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline, "
                   "FluxControlPipeline, FluxControlImg2ImgPipeline, FluxControlInpaintPipeline, "
                   "FluxControlNetPipeline, FluxControlNetImg2ImgPipeline, FluxControlNetInpaintPipeline, "
                   "FluxKontextPipeline, FluxKontextInpaintPipeline and others of that shape")


def compile(obj, quantize: str | None = None, backend: str = "auto", cuda_graphs="auto",
            attention: str = "bf16", parallel: str | None = None, ulysses_degree: int | None = None,
            cache=None) -> nn.Module:
    """Accelerate a FLUX transformer, autoencoder or pipeline (the table in the module docstring).

    quantize: None | "fp8-weight" (FP8 weights, any GPU) | "fp8" (W8A8, sm_89+). The model is modified in place
    (its parameters are reused, batched or quantized, never duplicated): keep using the returned object.
    backend: "auto" | "triton" | "torch" (the autoencoder's ops are C++/CUDA: "triton" means "auto" there).
    cuda_graphs: "auto" (on for a CUDA model) | True | False. attention: "bf16" (the model's dtype) | "fp8" (e4m3
    q, k, v with per-(batch, head) scales, sm_89+; off by default: benchmarks/NOTES.md has its accuracy).
    quantize and attention apply to the transformer and a ControlNet's trunk, cuda_graphs to the transformer only (a
    compiled ControlNet runs eagerly, and so does a transformer call given ControlNet residuals).
    parallel: None | "ulysses" | "ring" | "usp" (with ulysses_degree): context parallelism over the process group
    fluxrt.parallel.init() joined (the transformer only; every rank compiles in step and calls with the same inputs;
    CUDA graphs are then off, attention must be "bf16").
    cache: None | a fluxrt.cache config | its spec ("fbc:0.08", "taylorseer:1:5:5"): step caching for calls that pass
    no cache_states of their own (the transformer only). A diffusers transformer's enable_cache(FirstBlockCacheConfig
    | TaylorSeerCacheConfig) is mapped to the same (fluxrt.diffusers_state); a cache= that disagrees with it is an
    error, and other diffusers caches are refused.
    """
    return prepare(obj, quantize=quantize, backend=backend, cuda_graphs=cuda_graphs, attention=attention,
                   parallel=parallel, ulysses_degree=ulysses_degree, cache=cache)()


def prepare(obj, quantize: str | None = None, backend: str = "auto", cuda_graphs="auto",
            attention: str = "bf16", parallel: str | None = None,
            ulysses_degree: int | None = None, cache=None) -> Callable[[], nn.Module]:
    """compile's check phase: every check compile(obj, ...) makes, with obj left untouched; returns the move phase,
    the call that converts and builds the compiled model. A caller compiling several models as one step (a
    pipeline's transformer, autoencoder and ControlNet) prepares all of them before building any."""
    _check_arguments(quantize, backend, cuda_graphs, attention)
    step_cache = parse_cache(cache)
    if step_cache is not None and parallel is not None:
        raise ValueError("cache= and parallel= do not combine yet: choose one")
    context = _check_parallel(parallel, ulysses_degree, cuda_graphs, attention)
    if is_diffusers_pipeline(obj):
        return _prepare_pipeline(obj, quantize, backend, cuda_graphs, attention, context, step_cache)
    for name, value in (("parallel", context), ("cache", step_cache)):
        if value is not None and not (isinstance(obj, Flux) or is_diffusers_flux(obj)):
            raise ValueError(f"{name}= applies to a FLUX transformer (or a pipeline's), not to a {type(obj).__name__}")
    if isinstance(obj, AutoEncoder) or is_diffusers_autoencoder_kl(obj):
        for name, value, default in (("quantize", quantize, None), ("attention", attention, "bf16")):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to the transformer; the autoencoder runs in its own dtype")
        return _prepare_autoencoder(obj, backend)
    if is_diffusers_controlnet(obj) or is_diffusers_multi_controlnet(obj) or _is_compiled_controlnet(obj):
        if cuda_graphs is True:
            raise ValueError("cuda_graphs=True applies to the transformer: a compiled ControlNet runs without CUDA "
                             "graphs; leave cuda_graphs at 'auto' or False")
        return _prepare_controlnet(obj, quantize, backend, attention)
    return _prepare_transformer(obj, quantize, backend, cuda_graphs, attention, context, step_cache)


def _check_parallel(scheme, ulysses_degree, cuda_graphs, attention) -> tuple[str, int | None] | None:
    """(scheme, ulysses_degree) after the checks that need no process group, or None without parallel=."""
    if scheme is None:
        if ulysses_degree is not None:
            raise ValueError("ulysses_degree goes with parallel='usp'; pass parallel= too")
        return None
    from . import parallel

    if scheme not in parallel.SCHEMES:
        raise ValueError(f"parallel must be None or one of {', '.join(parallel.SCHEMES)}, got {scheme!r}")
    if cuda_graphs is True or attention != "bf16":
        raise ValueError("context parallelism runs without CUDA graphs and with attention='bf16': leave cuda_graphs "
                         "at 'auto' (off then) or False, and attention at 'bf16'")
    if not parallel.dist.is_initialized():
        raise RuntimeError("parallel= needs a process group: call fluxrt.parallel.init() first (or launch with "
                           "torchrun)")
    return scheme, ulysses_degree


def _prepare_pipeline(pipe, quantize, backend, cuda_graphs, attention, context=None,
                      step_cache=None) -> Callable[[], nn.Module]:
    """A diffusers pipeline is a FLUX pipeline by its components, not its class: a FluxTransformer2DModel transformer
    and an AutoencoderKL vae (and, in the ControlNet pipelines, a controlnet). All are checked before any moves, so a
    component that cannot convert leaves the others as they were."""
    components = pipe.components
    transformer, vae = components.get("transformer"), components.get("vae")
    if not (is_diffusers_flux(transformer) or isinstance(transformer, FastFluxTransformer)) or not (
            is_diffusers_autoencoder_kl(vae) or isinstance(vae, FastAutoencoderKL)):
        raise TypeError(f"fluxrt.compile accepts a diffusers pipeline whose transformer is a FluxTransformer2DModel "
                        f"and whose vae is an AutoencoderKL ({_FLUX_PIPELINES}); this {type(pipe).__name__} has "
                        f"transformer {type(transformer).__name__} and vae {type(vae).__name__}")
    builds = {"transformer": _prepare_transformer(transformer, quantize, backend, cuda_graphs, attention, context,
                                                  step_cache),
              "vae": _prepare_autoencoder(vae, backend)}
    if "controlnet" in components:
        builds["controlnet"] = _prepare_controlnet(components["controlnet"], quantize, backend, attention)
    reapply_offload = keep_model_offload(pipe)

    def build_pipeline():
        built = {name: build() for name, build in builds.items()}
        for name, module in built.items():
            setattr(pipe, name, module)
        reapply_offload()  # enable_model_cpu_offload() called before compile: its hook chain over the new modules
        return pipe

    return build_pipeline


def _check_arguments(quantize, backend, cuda_graphs, attention) -> None:
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if quantize not in (None, "fp8", "fp8-weight"):
        raise ValueError(f"quantize must be None, 'fp8' (W8A8) or 'fp8-weight', got {quantize!r}")
    if cuda_graphs not in ("auto", False, True):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if attention not in ("bf16", "fp8"):
        raise ValueError(f"attention must be 'bf16' or 'fp8', got {attention!r}")


def _is_compiled_controlnet(obj) -> bool:
    # fluxrt.controlnet imports diffusers: it is loaded only by compiling a ControlNet, so unloaded, none exists
    controlnet = sys.modules.get(f"{__package__}.controlnet")
    return controlnet is not None and isinstance(obj, controlnet.FastFluxControlNetModel)


def _refuse_compiled(obj, what: str) -> None:
    if isinstance(obj, _COMPILED) or _is_compiled_controlnet(obj):
        raise TypeError(f"{what} is already compiled by fluxrt ({type(obj).__name__}): use it as it is; to compile "
                        "with other options, compile the original model again")


def _prepare_transformer(obj, quantize, backend, cuda_graphs, attention, context=None,
                         step_cache=None) -> Callable[[], nn.Module]:
    """Check everything a transformer's compile needs; return the call that then converts and builds it."""
    _refuse_compiled(obj, "the transformer")
    adapters = None
    if is_diffusers_flux(obj):
        convert, adapters = check_flux_conversion(obj)  # adapters: peft LoRAs loaded before compile (or None)
        step_cache = compile_step_cache(obj, step_cache)  # cache= or the model's enable_cache(...), mapped
        if step_cache is not None and context is not None:
            raise ValueError("the transformer's diffusers cache (enable_cache) and parallel= do not combine yet: call "
                             "transformer.disable_cache() first, or compile without parallel=")
        device = next(obj.parameters()).device
        config = obj.config
    elif isinstance(obj, Flux):
        check_compilable(obj, quantize)
        device = next(obj.parameters()).device
        convert, config = (lambda: obj), None
    else:
        raise TypeError(f"fluxrt.compile accepts a fluxrt.reference.Flux or AutoEncoder, a diffusers "
                        f"FluxTransformer2DModel, AutoencoderKL, FluxControlNetModel or FluxMultiControlNetModel, or "
                        f"a diffusers FLUX pipeline ({_FLUX_PIPELINES}); got {type(obj).__name__}")
    _check_device(device, quantize, attention)
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    graphs = device.type == "cuda" and context is None if cuda_graphs == "auto" else cuda_graphs
    if context is not None:
        from . import parallel

        num_heads = obj.num_heads if isinstance(obj, Flux) else obj.config.num_attention_heads
        parallel.check_scheme(context[0], num_heads, context[1])  # before anything moves
    build_core = _core_builder(quantize, backend, graphs, attention, context, step_cache)

    def build() -> nn.Module:
        fast = build_core(convert())
        if config is None:
            return fast
        transformer = FastFluxTransformer(fast, config)
        if adapters is not None:
            transformer.adopt_peft_adapters(adapters)  # the same adapters, weights and active set, as side branches
        return transformer

    return build


def _check_device(device, quantize, attention) -> None:
    if quantize == "fp8":
        require_fp8_tensor_cores(device, "quantize='fp8' (W8A8)", "use quantize='fp8-weight' (weight-only FP8)")
    if attention == "fp8":
        require_fp8_tensor_cores(device, "attention='fp8'", "use attention='bf16'")


def _core_builder(quantize, backend, graphs: bool, attention, context=None,
                  step_cache=None) -> Callable[[Flux], FastFlux]:
    """flux -> FastFlux as compile's options ask (quantized first when asked; context: (scheme, ulysses_degree) for
    context parallelism, whose process groups are made here, by every rank in step)."""

    def build_core(flux: Flux) -> FastFlux:
        mesh = None
        if context is not None:
            from . import parallel

            mesh = parallel.make_mesh(context[0], flux.num_heads, context[1])
        if quantize is not None:
            quantize_model(flux, backend=backend, activations="fp8" if quantize == "fp8" else "bf16")
        fast = FastFlux(flux, backend=backend, cuda_graphs=graphs, attention=attention, parallel=mesh)
        if step_cache is not None:
            fast.cache = step_cache
            fast._refresh_plan()
        log.info("fluxrt.compile plan: %s", fast.plan)
        return fast

    return build_core


def _prepare_controlnet(obj, quantize, backend, attention) -> Callable[[], nn.Module]:
    """A FluxControlNetModel (compiled to a FastFluxControlNetModel) or a FluxMultiControlNetModel (its nets
    compiled in place), with the transformer's quantize, backend and attention; checked first, as the transformer."""
    _refuse_compiled(obj, "the ControlNet")
    if is_diffusers_multi_controlnet(obj):
        from .controlnet import prepare_multi_controlnet

        return prepare_multi_controlnet(obj, lambda net: _prepare_one_controlnet(net, quantize, backend, attention))
    return _prepare_one_controlnet(obj, quantize, backend, attention)


def _prepare_one_controlnet(obj, quantize, backend, attention) -> Callable[[], nn.Module]:
    _refuse_compiled(obj, "the ControlNet")
    if not is_diffusers_controlnet(obj):
        raise TypeError(f"fluxrt.compile compiles a FLUX pipeline's controlnet when it is a diffusers "
                        f"FluxControlNetModel or a FluxMultiControlNetModel of them; got {type(obj).__name__}")
    from .controlnet import prepare_controlnet

    build = prepare_controlnet(obj, _core_builder(quantize, backend, False, attention))
    _check_device(next(obj.parameters()).device, quantize, attention)  # parameters checked real by prepare_controlnet
    return build


def _prepare_autoencoder(obj, backend) -> Callable[[], nn.Module]:
    _refuse_compiled(obj, "the autoencoder")
    return check_autoencoder(obj, backend)
