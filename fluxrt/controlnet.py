"""fluxrt.compile for diffusers' FLUX ControlNets: FluxControlNetModel and FluxMultiControlNetModel.

A FluxControlNetModel is FLUX's trunk (the embedders, double and single blocks; no output layer) plus its own layers:
controlnet_x_embedder (the control latents, added to the image tokens), an optional mode embedding (Union: one token
put before the text), an optional input_hint_block (XLabs: convolutions over the control image in pixels), and one
linear per block turning that block's image tokens into the residual the transformer adds after its own blocks
(controlnet_blocks, controlnet_single_blocks; fluxrt.transformer.controlnet_residuals applies them).

The trunk is converted like the transformer (checked on meta tensors, then moved: fluxrt.diffusers_adapter) and
runs on FastFlux's fused blocks; the ControlNet's own layers are kept as they are (the same module objects, shared
with the consumed diffusers model) and called as diffusers calls them. The compiled model subclasses
FluxControlNetModel because the ControlNet pipelines pick their code path with isinstance(pipe.controlnet,
FluxControlNetModel); its forward takes diffusers' arguments and returns diffusers' types, and save_pretrained
writes diffusers' FluxControlNetModel folder. It runs eagerly (no CUDA graphs), and refuses per-layer (sequential)
offload at the call, as FastFlux does. A FluxMultiControlNetModel stays itself: its nets are swapped for compiled
ones (its forward only sums their outputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.controlnets.controlnet_flux import (
    FluxControlNetModel,
    FluxControlNetOutput,
    FluxMultiControlNetModel,
)
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from . import ops
from .config import FluxConfig
from .convert import CheckpointError
from .diffusers_adapter import check_conversion, check_joint_attention_kwargs, per_sample
from .diffusers_save import DiffusersStandIn, save_controlnet
from .transformer import FastFlux, refuse_offloaded_weights

# The ControlNet's own layers (kept and called as they are); every other parameter belongs to the FLUX trunk.
_OWN_LAYERS = ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.",
               "controlnet_mode_embedder.", "input_hint_block.")
_OWN_CONFIG = ("num_mode", "conditioning_embedding_channels")  # config fields a FluxTransformer2DModel lacks


class FastFluxControlNetModel(DiffusersStandIn, FluxControlNetModel):
    """Drop-in for a diffusers FluxControlNetModel (forward arguments, return type, .config/.dtype/.device,
    .input_hint_block, isinstance, save_pretrained), its trunk run by a FastFlux. `plan` is the FastFlux's plan.
    A DiffusersStandIn: a pipeline records and saves it as a FluxControlNetModel (fluxrt.diffusers_save)."""

    diffusers_class_name = "FluxControlNetModel"

    def __init__(self, fast: FastFlux, source: FluxControlNetModel):
        # ModelMixin's, not FluxControlNetModel's __init__ (the next one DiffusersStandIn's would call): that one would
        # build (and allocate) the layers the FastFlux replaces. So the stand-in reports diffusers' module here. The
        # config is the source's, so the pipeline reads the same fields.
        ModelMixin.__init__(self)
        self._report_diffusers_module()
        self._internal_dict = source.config
        self.fast = fast
        self.plan = fast.plan
        self.union = source.union
        self.input_hint_block = source.input_hint_block
        self.controlnet_x_embedder = source.controlnet_x_embedder
        self.controlnet_mode_embedder = source.controlnet_mode_embedder if source.union else None
        self.controlnet_blocks = source.controlnet_blocks
        self.controlnet_single_blocks = source.controlnet_single_blocks
        self.gradient_checkpointing = False

    def forward(self, hidden_states: Tensor, controlnet_cond: Tensor, controlnet_mode: Tensor = None,
                conditioning_scale: float = 1.0, encoder_hidden_states: Tensor = None,
                pooled_projections: Tensor = None, timestep: Tensor = None, img_ids: Tensor = None,
                txt_ids: Tensor = None, guidance: Tensor = None, joint_attention_kwargs: dict | None = None,
                return_dict: bool = True):
        check_joint_attention_kwargs(joint_attention_kwargs)
        refuse_offloaded_weights(self.fast)  # the blocks are run here, not through FastFlux.forward and its check
        m = self.fast.model
        batch = hidden_states.shape[0]
        timestep = per_sample(timestep, batch)
        guidance = per_sample(guidance, batch) if m.params.guidance_embed else None
        img_ids, txt_ids = m._check_inputs(hidden_states, img_ids, encoder_hidden_states, txt_ids, timestep,
                                           pooled_projections, guidance)
        with ops.trace() as ran:
            block_samples, single_block_samples = self._samples(hidden_states, controlnet_cond, controlnet_mode,
                                                                encoder_hidden_states, pooled_projections, timestep,
                                                                img_ids, txt_ids, guidance)
        self.plan["last_call"] = {op: sorted(backends) for op, backends in ran.backends().items()}
        # diffusers scales each residual, and gives None for a kind of block the ControlNet does not have
        block_samples = [sample * conditioning_scale for sample in block_samples] or None
        single_block_samples = [sample * conditioning_scale for sample in single_block_samples] or None
        if not return_dict:
            return (block_samples, single_block_samples)
        return FluxControlNetOutput(controlnet_block_samples=block_samples,
                                    controlnet_single_block_samples=single_block_samples)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str = "10GB") -> None:
        """Write the diffusers folder FluxControlNetModel.from_pretrained loads (fluxrt.diffusers_save)."""
        save_controlnet(self, save_directory, safe_serialization, variant, max_shard_size)

    def _samples(self, hidden_states, controlnet_cond, controlnet_mode, encoder_hidden_states, pooled_projections,
                 timestep, img_ids, txt_ids, guidance) -> tuple[list[Tensor], list[Tensor]]:
        """The per-block residuals before conditioning_scale: each block's image tokens through its linear."""
        m = self.fast.model
        img = m.img_in(hidden_states) + self.controlnet_x_embedder(self._control_tokens(controlnet_cond))
        txt = m.txt_in(encoder_hidden_states)
        if self.union:
            if controlnet_mode is None:
                raise ValueError("`controlnet_mode` cannot be `None` when applying ControlNet-Union")
            # the mode's embedding goes first in the text stream, with the first text token's position
            txt = torch.cat((self.controlnet_mode_embedder(controlnet_mode), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)
        vec, mods, cos, sin = self.fast.conditioning(timestep, pooled_projections, guidance, txt_ids, img_ids,
                                                     img.dtype)
        samples = {"double": [], "single": []}
        layers = {"double": self.controlnet_blocks, "single": self.controlnet_single_blocks}

        def project(kind: str, index: int, tokens: Tensor) -> None:
            if index < len(layers[kind]):  # diffusers zips the blocks' outputs with these layers
                samples[kind].append(layers[kind][index](tokens))

        self.fast.run_blocks(img, txt, mods, cos, sin, after_block=project)
        return samples["double"], samples["single"]

    def _control_tokens(self, controlnet_cond: Tensor) -> Tensor:
        """The control input as image tokens: packed latents as given, or (XLabs) the input_hint_block's features
        of the control image, [B, C, H, W] -> [B, H*W, C] (patch size 1, which fluxrt's config check ensures)."""
        if self.input_hint_block is None:
            return controlnet_cond
        return self.input_hint_block(controlnet_cond).flatten(2).transpose(1, 2)


def _trunk_config(model: FluxControlNetModel) -> FluxConfig:
    """The trunk's FluxConfig from the ControlNet's config (the transformer's fields; no output layer, so
    out_channels is only a placeholder)."""
    fields = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k not in _OWN_CONFIG}
    try:
        return FluxConfig.from_diffusers(fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"this FluxControlNetModel's config is not a FLUX.1 ControlNet's: {err}") from None


def prepare_controlnet(model: FluxControlNetModel, build_core: Callable) -> Callable[[], FastFluxControlNetModel]:
    """Check everything compiling `model` needs (its trunk's conversion on meta tensors; nothing moves); return the
    build. build_core(flux) quantizes and wraps the converted trunk as the transformer's compile does."""
    move = check_conversion(model, _trunk_config(model), "FluxControlNetModel", kept=_OWN_LAYERS, final_layer=False)

    def build() -> FastFluxControlNetModel:
        return FastFluxControlNetModel(build_core(move()), model)

    return build


def prepare_multi_controlnet(multi: FluxMultiControlNetModel, prepare_net: Callable) -> Callable[[], nn.Module]:
    """Check every net of `multi` (prepare_net(net) -> build) before any moves; the build swaps each net for its
    compiled form and returns `multi` itself. A net listed twice is compiled once."""
    # one build per distinct net (modules hash by identity): compiling a net listed twice a second time would read
    # the weights the first compile moved out
    builds = {id(net): prepare_net(net) for net in dict.fromkeys(multi.nets)}

    def build() -> FluxMultiControlNetModel:
        compiled = {key: make() for key, make in builds.items()}
        for index, net in enumerate(list(multi.nets)):
            multi.nets[index] = compiled[id(net)]
        return multi

    return build

