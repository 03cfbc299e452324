"""The accelerated FLUX transformer, built from fluxrt.ops only (DESIGN.md §2).

So far: the double and single block forwards rewired onto the fused norm / residual / rope / attention ops,
reading the weights of a fluxrt.reference block. The linears are plain (the FP8 issue). fluxrt.compile
assembles these into a model.

cos, sin: the RoPE table of the joint sequence, [B|1, T+L, head_dim/2] fp32 (fluxrt.kernels.rope_qk_norm.rope_cos_sin).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .reference.model import DoubleStreamBlock, SingleStreamBlock


def _attention(qkv: Tensor, backend: str) -> Tensor:
    """[3, B, H, S, D] as rope_qk_norm writes it -> [B, S, H*D] as the projection reads it (no transpose copy)."""
    return ops.joint_attention(qkv[0], qkv[1], qkv[2], backend=backend)


def double_block_forward(block: DoubleStreamBlock, img: Tensor, txt: Tensor, vec: Tensor, cos: Tensor, sin: Tensor,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    img_mod1, img_mod2 = block.img_mod(vec)  # shift/scale/gate: [B, 1, C] views, no copies
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    img_x = ops.modulated_layer_norm(img, img_mod1.scale, img_mod1.shift, backend=backend)
    txt_x = ops.modulated_layer_norm(txt, txt_mod1.scale, txt_mod1.shift, backend=backend)
    img_norm, txt_norm = block.img_attn.norm, block.txt_attn.norm
    qkv = ops.rope_qk_norm_joint(
        block.txt_attn.qkv(txt_x), block.img_attn.qkv(img_x),
        txt_norm.query_norm.scale, txt_norm.key_norm.scale, img_norm.query_norm.scale, img_norm.key_norm.scale,
        cos, sin, block.num_heads, backend=backend,
    )
    attn = _attention(qkv, backend)
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

    img, img_x = ops.gated_residual_norm(img, img_mod1.gate, block.img_attn.proj(img_attn), img_mod2.scale,
                                         img_mod2.shift, backend=backend)
    img = ops.gated_residual(img, img_mod2.gate, block.img_mlp(img_x), backend=backend)
    txt, txt_x = ops.gated_residual_norm(txt, txt_mod1.gate, block.txt_attn.proj(txt_attn), txt_mod2.scale,
                                         txt_mod2.shift, backend=backend)
    txt = ops.gated_residual(txt, txt_mod2.gate, block.txt_mlp(txt_x), backend=backend)
    return img, txt


def single_block_forward(block: SingleStreamBlock, x: Tensor, vec: Tensor, cos: Tensor, sin: Tensor,
                         backend: str = "auto") -> Tensor:
    mod, _ = block.modulation(vec)
    x_mod = ops.modulated_layer_norm(x, mod.scale, mod.shift, backend=backend)
    hidden = block.linear1(x_mod)  # [B, S, 3C + mlp]; the qkv columns are read in place, no split copy
    qkv = ops.rope_qk_norm(hidden[..., : 3 * block.hidden_size], block.norm.query_norm.scale,
                           block.norm.key_norm.scale, cos, sin, block.num_heads, backend=backend)
    mlp = block.mlp_act(hidden[..., 3 * block.hidden_size :])
    out = block.linear2(torch.cat((_attention(qkv, backend), mlp), dim=2))
    return ops.gated_residual(x, mod.gate, out, backend=backend)
