"""fluxrt.compile for a diffusers FluxTransformer2DModel: the same call, kwargs and return type back.

The diffusers weights are converted to a fluxrt.reference.Flux by moving tensors (renames keep the storage;
q|k|v are fused into one new tensor and their sources are released at once), so peak memory stays about one
copy of the weights. The diffusers model is consumed: its parameters are left empty afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .config import FluxConfig
from .convert import diffusers_to_bfl
from .reference import Flux


class _Consuming(Mapping):
    """A diffusers model's parameters by state-dict key; reading one detaches it from the model."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._keys = [k for k, _ in model.named_parameters()]
        if len(self._keys) != len(model.state_dict()):
            raise TypeError("the diffusers transformer has buffers fluxrt does not know; refusing to convert it")

    def __getitem__(self, key: str) -> Tensor:
        module_name, _, name = key.rpartition(".")
        module = self._model.get_submodule(module_name)
        value = getattr(module, name).detach()
        setattr(module, name, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def flux_from_diffusers(model: nn.Module) -> Flux:
    config = FluxConfig.from_diffusers(dict(model.config))
    dtype = next(model.parameters()).dtype
    state_dict = diffusers_to_bfl(_Consuming(model))
    with torch.device("meta"):
        flux = Flux(config)
    flux.load_state_dict(state_dict, strict=True, assign=True)
    return flux.to(dtype).requires_grad_(False).eval()


class FastFluxTransformer(nn.Module):
    """Drop-in for diffusers' FluxTransformer2DModel (forward kwargs, return type, .config/.dtype/.device)."""

    def __init__(self, fast: nn.Module, config):
        super().__init__()
        self.fast = fast
        self.config = config
        self.plan = fast.plan

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """FluxPipeline wraps each call in this (diffusers' CacheMixin); fluxrt registers no cache hooks."""
        yield

    @property
    def dtype(self) -> torch.dtype:
        return self.fast.model.img_in.bias.dtype

    @property
    def device(self) -> torch.device:
        return self.fast.model.img_in.bias.device

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor = None, pooled_projections: Tensor = None,
                timestep: Tensor = None, img_ids: Tensor = None, txt_ids: Tensor = None, guidance: Tensor = None,
                joint_attention_kwargs: dict | None = None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict: bool = True, controlnet_blocks_repeat: bool = False):
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise NotImplementedError("fluxrt's compiled transformer does not take ControlNet residuals; "
                                      "run the ControlNet pipeline on the uncompiled model")
        kwargs = dict(joint_attention_kwargs or {})
        if kwargs.pop("scale", 1.0) != 1.0:
            raise NotImplementedError("joint_attention_kwargs['scale'] (a LoRA scale) is not supported by fluxrt's "
                                      "compiled transformer: fuse the LoRA into the weights before fluxrt.compile")
        if kwargs:
            raise NotImplementedError(f"joint_attention_kwargs {sorted(kwargs)} are not supported by fluxrt's "
                                      "compiled transformer (IP-Adapter and custom attention processors included)")
        batch = hidden_states.shape[0]
        out = self.fast(
            img=hidden_states, img_ids=img_ids, txt=encoder_hidden_states, txt_ids=txt_ids,
            timesteps=timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep, y=pooled_projections,
            guidance=(guidance.reshape(-1).expand(batch) if guidance is not None and guidance.numel() == 1 else guidance)
            if self.fast.model.params.guidance_embed else None,
        )
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def is_diffusers_flux(obj) -> bool:
    return type(obj).__name__ == "FluxTransformer2DModel" and type(obj).__module__.startswith("diffusers")


def is_diffusers_flux_pipeline(obj) -> bool:
    return type(obj).__name__ == "FluxPipeline" and type(obj).__module__.startswith("diffusers")
