"""fluxrt.ops: the one door from the runtime into kernels/ and csrc/ (DESIGN.md §2).

Every op is a torch.library custom op (schema + fake, so torch.compile traces it without graph breaks) taking
`backend="auto" | "triton" | "torch"`; see _backend.py for what each means. Kernel modules (and triton) are
imported on first use, not by `import fluxrt`.
"""

from ._backend import BACKENDS, Trace, record, trace
from .attention_lse import attention_lse
from .fp8_gemm import fp8_linear, w8a8_linear
from .group_norm_silu import add_group_norm_silu, group_norm_silu
from .joint_attention import joint_attention, joint_attention_fp8, joint_attention_fp8_out, quantize_qkv_fp8
from .lora import lora_add
from .modulated_norm import (
    gated_residual,
    gated_residual_norm,
    gated_residual_norm_fp8,
    modulated_layer_norm,
    modulated_layer_norm_fp8,
)
from .quantize_rows import quantize_rows
from .rope_qk_norm import rope_cos_sin, rope_qk_norm, rope_qk_norm_joint, rope_qk_norm_joint_v_absmax

__all__ = [
    "BACKENDS",
    "Trace",
    "add_group_norm_silu",
    "attention_lse",
    "fp8_linear",
    "gated_residual",
    "gated_residual_norm",
    "gated_residual_norm_fp8",
    "group_norm_silu",
    "joint_attention",
    "joint_attention_fp8",
    "joint_attention_fp8_out",
    "lora_add",
    "modulated_layer_norm",
    "modulated_layer_norm_fp8",
    "quantize_qkv_fp8",
    "quantize_rows",
    "rope_cos_sin",
    "rope_qk_norm",
    "rope_qk_norm_joint",
    "rope_qk_norm_joint_v_absmax",
    "record",
    "trace",
    "w8a8_linear",
]
