"""The pipeline a server runs and the name it serves it under: one place for `fluxrt serve` (fluxrt.cli) and the
Ray Serve replicas (fluxrt.serve.ray).

    pipe = load_pipeline("tiny-random", "cpu", loras=[(Path("style.safetensors"), 0.8)])
    served_model_name("/models/FLUX.1-dev")   # "FLUX.1-dev": what /v1/models shows and requests' "model" names
    replica_devices("cuda", 4)                # cuda:0..3: where `fluxrt serve --replicas 4` puts its pipelines
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

TINY = "tiny"  # the embedded trained model (fluxrt.tiny.TRAINED)


def load_pipeline(model: str, device, *, compile: bool | None = None, backend: str = "auto", autoencoder=None,
                  text_encoders=None, loras: Sequence[tuple[Path, float]] = ()):
    """The pipeline `model` names: tiny, a tiny-random model (built in process) or a local folder / file (with
    autoencoder= and text_encoders= for a file). compile None: compiled on a GPU, the reference on a CPU (compiled
    anyway with LoRAs: they are hot-swapped side branches). loras: (path, scale) pairs, see serve_loras."""
    from ..pipeline import FluxPipeline
    from ..tiny import TINY_RANDOM_MODELS, TRAINED, tiny_random_pipeline

    common = dict(compile=True if loras and compile is None else compile, backend=backend, progress=False)
    if model in TINY_RANDOM_MODELS:
        pipe = tiny_random_pipeline(device=device, mode=TINY_RANDOM_MODELS[model], **common)
    else:
        pipe = FluxPipeline.from_pretrained(TRAINED if model == TINY else model, autoencoder=autoencoder,
                                            text_encoders=text_encoders, device=device, **common)
    return serve_loras(pipe, loras)


def serve_loras(pipe, loras: Sequence[tuple[Path, float]]):
    """Load LoRA files hot-swapped (side branches of the compiled transformer), each named by its file's stem: what a
    request's "loras" names, at its own scale per request. Returns pipe."""
    if loras:
        pipe.enable_lora_hotswap(max_adapters=max(4, len(loras)))
    for path, scale in loras:
        pipe.load_lora(path, scale=scale)
    return pipe


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """"PATH[:SCALE]" -> (path, scale); a path that itself holds ':' is taken whole unless a number follows.
    ValueError for a non-finite scale or a file that does not exist."""
    path, _, scale = spec.rpartition(":")
    try:
        path, scale = (Path(path), float(scale)) if path else (Path(spec), 1.0)
    except ValueError:
        path, scale = Path(spec), 1.0
    if not math.isfinite(scale):
        raise ValueError(f"--lora {spec!r}: the scale after ':' must be a finite number")
    if not path.exists():
        raise ValueError(f"--lora {str(path)!r} does not exist (a LoRA .safetensors file, optionally :SCALE)")
    return path, scale


def served_model_name(model: str) -> str:
    """The name /v1/models shows and requests' "model" must match: tiny, tiny-random..., or the folder's name."""
    from ..tiny import TINY_RANDOM_MODELS

    return model if model == TINY or model in TINY_RANDOM_MODELS else Path(model).resolve().name


def replica_devices(device: torch.device, replicas: int) -> list[torch.device]:
    """Where `replicas` pipelines of one server go: cuda:0..N-1 on a GPU machine (CUDA_VISIBLE_DEVICES picks which
    GPUs), N on the one device otherwise (a CPU: for tests, the copies share its cores). ValueError naming the fix for
    a count that is not a positive int, a GPU index with several replicas, or more replicas than GPUs."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be a positive number of pipelines, got {replicas!r}")
    if device.type != "cuda" or replicas == 1:
        return [device] * replicas
    if device.index is not None:
        raise ValueError(f"--replicas {replicas} puts one pipeline on each of cuda:0..{replicas - 1}: pass --device "
                         f"cuda, not {device} (CUDA_VISIBLE_DEVICES chooses the GPUs)")
    gpus = torch.cuda.device_count()
    if replicas > gpus:
        raise ValueError(f"--replicas {replicas} needs {replicas} GPUs (one pipeline each) and this machine has {gpus}")
    return [torch.device("cuda", index) for index in range(replicas)]
