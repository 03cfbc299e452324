"""save_pretrained for fluxrt's compiled diffusers models: a folder plain diffusers loads back, safetensors only.

    pipe = fluxrt.compile(pipe)
    pipe.save_pretrained(folder)              # diffusers.FluxPipeline.from_pretrained(folder) loads it
    pipe.transformer.save_pretrained(folder)  # diffusers.FluxTransformer2DModel.from_pretrained(folder)
    pipe.vae.save_pretrained(folder)          # diffusers.AutoencoderKL.from_pretrained(folder)
    save_controlnet(compiled_controlnet, folder)  # diffusers.FluxControlNetModel.from_pretrained(folder)

What is written is what diffusers writes for the model fluxrt compiled: its config (kept by the compiled model) and
its weights under diffusers' names, converted back from fluxrt's BFL layout (fluxrt.convert.bfl_to_diffusers,
vae_bfl_to_diffusers; exact: the same values in the same dtype), by diffusers' own writer (config.json, shards of
`max_shard_size`, the index, `variant` file names). The converted weights are assembled in host memory (about the
model's size; a CPU model's tensors are shared, not copied), a GPU model's moved tensor by tensor, so its GPU
holds no second copy.

How a pipeline finds them: a DiffusionPipeline records each component's (library, class) in model_index.json and
picks its save method from the component's `__module__` and `__class__`. The compiled models are
DiffusersStandIns: they report the diffusers class they stand in for there (as unittest.mock's spec objects do),
so model_index.json says ("diffusers", "FluxTransformer2DModel") / ("diffusers", "AutoencoderKL") and the pipeline
calls their save_pretrained. type() still tells the truth. What follows: isinstance(compiled, ModelMixin) is True;
diffusers' Pipeline.from_pipe(pipe), which keeps a ModelMixin component only when its type() is the annotated
class, needs the compiled components passed explicitly (from_pipe(pipe, transformer=pipe.transformer,
vae=pipe.vae)); pickle refuses a compiled model (it checks __class__; copy.deepcopy works): save_pretrained it.

Atomic: everything is checked first (safetensors, not quantized, the target not a file), the folder is written
beside the target under a temporary name and moved into place only when complete. A save that fails leaves the
target as it was and no temporary folder. Into an existing folder, the new files replace the old ones of the same
names, and the old weight files of the same variant that the new save does not write are removed (as diffusers
does), other files are left alone.

Refused: quantized (FP8) weights, which diffusers' models cannot hold (fluxrt.save_transformer writes them), and
safe_serialization=False (pickle files). A pipeline's save_pretrained is diffusers' loop over its components: the
components it saved before a refused one stay written, model_index.json (written last) is not, so the folder does
not load as a pipeline.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .convert import bfl_to_diffusers, vae_bfl_to_diffusers


class DiffusersStandIn:
    """Mixin (before nn.Module) of a compiled model that stands in for the diffusers class `diffusers_class_name`:
    `__class__` and `__module__` report that class, so a DiffusionPipeline registers and saves it as one (module
    docstring). repr() and type() name the fluxrt class."""

    diffusers_class_name: str  # set by each subclass, e.g. "FluxTransformer2DModel"

    def __init__(self, *args, **kwargs):
        self._report_diffusers_module()
        super().__init__(*args, **kwargs)

    def _report_diffusers_module(self) -> None:
        """Set by __init__; a subclass whose __init__ bypasses this one's (calling ModelMixin.__init__ directly, say)
        calls it itself. An instance attribute: the class's own __module__ stays fluxrt's (imports, tracebacks)."""
        self.__dict__["__module__"] = self._diffusers_class().__module__

    def _diffusers_class(self) -> type:
        return getattr(importlib.import_module("diffusers"), self.diffusers_class_name)

    @property
    def __class__(self):
        return self._diffusers_class()

    def _get_name(self) -> str:  # nn.Module's repr names self.__class__
        return type(self).__name__


def save_transformer(compiled: nn.Module, save_directory, safe_serialization: bool = True, variant: str | None = None,
                     max_shard_size: int | str = "10GB") -> None:
    """A compiled diffusers FluxTransformer2DModel (fluxrt.diffusers_adapter.FastFluxTransformer) as diffusers'
    FluxTransformer2DModel folder."""
    model = compiled.fast.model  # the fluxrt.reference.Flux it runs (BFL names)
    _check_request(save_directory, safe_serialization, variant)
    _refuse_quantized(model)
    weights = bfl_to_diffusers(_OnCpu(model.state_dict()))
    _write(save_directory, "FluxTransformer2DModel", compiled.config, weights, variant, max_shard_size)


def save_autoencoder(compiled: nn.Module, save_directory, safe_serialization: bool = True, variant: str | None = None,
                     max_shard_size: int | str = "10GB") -> None:
    """A compiled diffusers AutoencoderKL (fluxrt.vae.FastAutoencoderKL) as diffusers' AutoencoderKL folder."""
    _check_request(save_directory, safe_serialization, variant)
    weights = vae_bfl_to_diffusers(_OnCpu(compiled.fast.ae.state_dict()))
    _write(save_directory, "AutoencoderKL", compiled.config, weights, variant, max_shard_size)


def save_controlnet(compiled: nn.Module, save_directory, safe_serialization: bool = True, variant: str | None = None,
                    max_shard_size: int | str = "10GB") -> None:
    """A compiled diffusers FluxControlNetModel (fluxrt.controlnet.FastFluxControlNetModel) as diffusers'
    FluxControlNetModel folder: its FLUX trunk converted back from BFL names, its own layers (controlnet_blocks,
    controlnet_x_embedder, ...: kept as they are by the compile) under their own names."""
    model = compiled.fast.model
    _check_request(save_directory, safe_serialization, variant)
    _refuse_quantized(model)
    weights = bfl_to_diffusers(_OnCpu(model.state_dict()))
    own = {k: v for k, v in compiled.state_dict().items() if not k.startswith("fast.")}
    weights.update(_OnCpu(own))
    _write(save_directory, "FluxControlNetModel", compiled.config, weights, variant, max_shard_size)


# ---- checks -------------------------------------------------------------------------------------------------------


def _check_request(save_directory, safe_serialization: bool, variant: str | None) -> None:
    if safe_serialization is not True:
        raise ValueError("fluxrt saves safetensors only (safe_serialization=False would write pickle files, which "
                         "fluxrt never writes or reads): call save_pretrained without safe_serialization=False")
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[A-Za-z0-9_]+", variant)):
        raise ValueError(f"variant must be a name such as 'fp16' or 'bf16' (letters, digits, _), got {variant!r}")
    target = pathlib.Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; save_pretrained writes a folder: give a folder path")


def _refuse_quantized(model: nn.Module) -> None:
    fp8 = sorted({str(t.dtype) for t in model.state_dict().values() if t.dtype.itemsize == 1 and t.is_floating_point()})
    if fp8:
        raise ValueError(f"this compiled transformer holds quantized ({', '.join(fp8)}) weights, which diffusers' "
                         "FluxTransformer2DModel cannot load: save it with fluxrt.save_transformer("
                         "pipe.transformer.fast.model, 'flux-fp8.safetensors') (fluxrt.load_transformer reads it "
                         "back), or save_pretrained the model compiled without quantize=")


# ---- conversion -------------------------------------------------------------------------------------------------


class _OnCpu(Mapping):
    """A state dict read lazily, each tensor moved to the host as it is read (no copy for a CPU model): the new
    tensors the conversion makes (q|k|v splits, swapped halves) are made in host memory, and a GPU model gets no
    second copy on its GPU. (Views of one storage, such as FastFlux's batched modulation weights, need no copy:
    safetensors writes non-overlapping views.)"""

    def __init__(self, state_dict: Mapping[str, Tensor]):
        self._state = state_dict

    def __getitem__(self, key: str) -> Tensor:
        return self._state[key].detach().to("cpu")

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def _diffusers_model(class_name: str, config, weights: dict[str, Tensor]) -> nn.Module:
    """The diffusers model `class_name` built from `config` with `weights` as its tensors (no copy)."""
    cls = getattr(importlib.import_module("diffusers"), class_name)
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    model.load_state_dict(weights, strict=True, assign=True)
    return model


# ---- writing ------------------------------------------------------------------------------------------------------


def _write(save_directory, class_name: str, config, weights: dict[str, Tensor], variant: str | None,
           max_shard_size) -> None:
    model = _diffusers_model(class_name, config, weights)
    max_shard_size = "10GB" if max_shard_size is None else max_shard_size  # diffusers' default
    target = pathlib.Path(save_directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.fluxrt-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
        _move_in(staging, target, variant)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; the partial folder after a failure


def _move_in(staging: pathlib.Path, target: pathlib.Path, variant: str | None) -> None:
    """Put the complete folder `staging` at `target`: a rename when target is new, else file by file (new files
    first, then the stale weights of this variant, so an interruption never leaves weights missing)."""
    if not target.exists():
        staging.rename(target)
        return
    written = {p.name for p in staging.iterdir()}
    blocked = [name for name in sorted(written) if (target / name).is_dir()]
    if blocked:
        raise ValueError(f"cannot save into {target}: {', '.join(blocked)} there is a folder where a file goes; "
                         "remove it or save elsewhere")
    stale = [p for p in target.iterdir() if p.is_file() and p.name not in written and _is_weights_file(p.name, variant)]
    for name in written:
        os.replace(staging / name, target / name)
    for path in stale:
        path.unlink()


def _is_weights_file(name: str, variant: str | None) -> bool:
    """Whether `name` is one of diffusers' safetensors weight files (single, shard or index) of `variant`."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    return name == f"{stem}.safetensors" or name == index or re.fullmatch(
        re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors", name) is not None
