"""FP8 (e4m3fn) weight quantization of a FLUX transformer's linears: per-output-channel fp32 scales.

    report = quantize(model)                  # in place: nn.Linear -> FP8Linear for the chosen layers
    save_transformer(model, "flux-fp8.safetensors")   # fp8 weights + `<layer>.scale_weight` [N] fp32
    fluxrt.load_transformer("flux-fp8.safetensors")    # the same model back, bit for bit

FP8Linear holds `weight` [N, K] float8_e4m3fn and `weight_scale` [N] float32 and computes
y = x @ (weight * weight_scale)^T + bias, either weight-only through fluxrt.ops.fp8_linear (the weights are
dequantized in registers; activations="bf16") or as dynamic W8A8 (activations="fp8": x quantized per token —
inside the preceding modulated-LN kernel where fluxrt.transformer can — then torch._scaled_mm with rowwise
scales or the Triton fp8 GEMM, `w8a8_gemm`). Its storage dtypes are the point: move a quantized model between
devices freely, but do not call .to(dtype) on it (PyTorch would cast the fp8 weights and fp32 scales like any float tensor).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from . import devices, ops

log = logging.getLogger("fluxrt")

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0, the largest finite e4m3fn (kernels/_common: the same)
SCALE_SUFFIX = "scale_weight"
WEIGHT_ONLY_MAX_ROWS = 16  # W8A8 linears run weight-only up to this many rows (kernels/fp8_gemm.py's GEMV path)
# W8A8 GEMM: "scaled_mm" (torch._scaled_mm, cuBLASLt, rowwise scales) or "triton" (kernels/fp8_gemm.py, fused
# epilogues). scaled_mm until benchmarks/bench_fp8_gemm.py has compared them on a GPU (not yet: NOTES.md).
W8A8_GEMMS = ("scaled_mm", "triton")  # the Comfy "scaled fp8" name for a weight's dequantization scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] -> (e4m3fn [N, K], fp32 scale [N]) with scale = absmax(row) / 448 (clamped away from 0)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def scaled_mm_rowwise(x8: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
                      out_dtype: torch.dtype) -> Tensor:
    """y = (x8 * x_scale) @ (weight * weight_scale)^T + bias for pre-quantized rows (e.g. from the fused
    modulated_layer_norm_fp8): x8 [..., K] e4m3fn, x_scale [...] fp32; weight [N, K] e4m3fn, scale [N]."""
    K, N = x8.shape[-1], weight.shape[0]
    y = torch._scaled_mm(x8.reshape(-1, K), weight.t(), scale_a=x_scale.reshape(-1, 1).float(),
                         scale_b=weight_scale.reshape(1, N), bias=bias, out_dtype=out_dtype)
    ops.record("w8a8_linear", "scaled_mm")  # the W8A8 GEMM's other backend (cuBLASLt), visible in ops.trace()
    return y.reshape(*x8.shape[:-1], N)


class FP8Rows(NamedTuple):
    """A linear's input already quantized, as a norm or attention kernel emits it for a W8A8 linear: e4m3fn rows
    x8 [..., K] with fp32 scales [...] (x ~ x8 * scale); dtype is the activations' (and the output's) dtype."""

    x8: Tensor
    scale: Tensor
    dtype: torch.dtype


def attention_and_gelu(attn: Tensor, mlp: Tensor) -> Tensor:
    """[attn | gelu_tanh(mlp)] along the last dim, what the single block's linear2 reads. Eager: GELU writes its part
    of the buffer directly, so only the narrow attention output is copied in (torch.cat would re-read and re-write
    the 4x-wide MLP activation). Under torch.compile (which rejects a strided `out=`) the cat, which inductor fuses."""
    if torch.compiler.is_compiling():
        return torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=-1)
    joined = mlp.new_empty(*mlp.shape[:-1], attn.shape[-1] + mlp.shape[-1])
    torch.ops.aten.gelu.out(mlp, approximate="tanh", out=joined[..., attn.shape[-1] :])
    joined[..., : attn.shape[-1]] = attn
    return joined


class BlockLinear:
    """A linear as the fast blocks (fluxrt.transformer) call it: each method is one step of BFL's block forward,
    fused as far as the linear's kind allows, so the block code reads like BFL's whatever the linears are. This base
    is a plain linear's behaviour, written with self(x) and self.linear_gelu(x) (fluxrt.transformer.PlainLinear
    wraps an nn.Linear in it); FP8Linear overrides the steps its weight-only and W8A8 forms fuse further."""

    def reads_fp8_rows(self, x: Tensor) -> bool:
        """Whether this linear reads an input of x's size as FP8Rows (W8A8), so that its producer may emit them."""
        return False

    def gelu_in_gemm(self, x: Tensor | FP8Rows) -> bool:
        """Whether linear_gelu(x) applies the GELU inside its GEMM; where not, a W8A8 consumer, which quantizes its
        input rows anyway, can take the GELU into that pass instead (FP8Linear.gated_gelu)."""
        return True

    def after_norm(self, x: Tensor, scale: Tensor, shift: Tensor, backend: str) -> Tensor:
        """self(LN(x) * (1 + scale) + shift)."""
        return self(ops.modulated_layer_norm(x, scale, shift, backend=backend))

    def after_residual_norm(self, h: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                            backend: str) -> tuple[Tensor, Tensor | FP8Rows]:
        """(h + gate * y, LN(h + gate * y) * (1 + scale) + shift in the form this linear reads), in one pass."""
        return ops.gated_residual_norm(h, gate, y, scale, shift, backend=backend)

    def linear_gelu(self, x: Tensor | FP8Rows) -> Tensor:
        """gelu_tanh(self(x))."""
        return F.gelu(self(x), approximate="tanh")

    def gated(self, x: Tensor, residual: Tensor, gate: Tensor, backend: str) -> Tensor:
        """residual + gate * self(x)."""
        return ops.gated_residual(residual, gate, self(x), backend=backend)

    def gated_attention_mlp(self, attention: Tensor, hidden: Tensor, residual: Tensor, gate: Tensor,
                            backend: str) -> Tensor:
        """The single block's linear2: residual + gate * self([attention | gelu_tanh(mlp)]). hidden is linear1's
        output [q | k | v | mlp] ([..., 3C + mlp], attention [..., C]); its v columns are dead once rope_qk_norm
        has copied q, k, v out, so an implementation may overwrite them."""
        C = attention.shape[-1]
        return self.gated(attention_and_gelu(attention, hidden[..., 3 * C :]), residual, gate, backend)


class FP8Linear(BlockLinear, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16, backend: str = "auto", activations: str = "bf16",
                 w8a8_gemm: str = "scaled_mm"):
        super().__init__()
        if activations not in ("bf16", "fp8"):
            raise ValueError(f"activations must be 'bf16' (weight-only) or 'fp8' (W8A8), got {activations!r}")
        if w8a8_gemm not in W8A8_GEMMS:
            raise ValueError(f"w8a8_gemm must be one of {W8A8_GEMMS}, got {w8a8_gemm!r}")
        self.w8a8_gemm = w8a8_gemm
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.activations = activations
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", activations: str = "bf16",
                    w8a8_gemm: str = "scaled_mm") -> "FP8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                bias_dtype=linear.weight.dtype, backend=backend, activations=activations, w8a8_gemm=w8a8_gemm)
        w8, scale = quantize_weight(linear.weight)
        q.weight.data, q.weight_scale.data = w8, scale
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().clone()
        return q

    def forward(self, x: Tensor | FP8Rows) -> Tensor:
        if isinstance(x, FP8Rows):
            return self.forward_fp8(x.x8, x.scale, out_dtype=x.dtype)
        if self.uses_fp8_activations(x):
            return self.forward_fp8(*ops.quantize_rows(x, backend=self.backend), out_dtype=x.dtype)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, backend=self.backend)

    def uses_fp8_activations(self, x: Tensor) -> bool:
        """W8A8 for more than WEIGHT_ONLY_MAX_ROWS rows. Up to that (the modulation GEMVs, M = batch) the op is a
        read of the weights, so the weight-only kernel is as fast and keeps the activations exact."""
        return self.activations == "fp8" and x.numel() > WEIGHT_ONLY_MAX_ROWS * x.shape[-1]

    def forward_fp8(self, x8: Tensor, x_scale: Tensor, residual: Tensor | None = None, gate: Tensor | None = None,
                    epilogue: str = "none", out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """W8A8 on rows already quantized (x8 e4m3fn [..., K], x_scale fp32 [...], e.g. from the fused
        modulated_layer_norm_fp8), with fp8_linear's epilogues: fused into the GEMM with w8a8_gemm="triton",
        applied after torch._scaled_mm otherwise."""
        if self.w8a8_gemm == "triton":
            return ops.w8a8_linear(x8, x_scale, self.weight, self.weight_scale, self.bias, residual, gate, epilogue,
                                   out_dtype, backend=self.backend)
        y = scaled_mm_rowwise(x8, x_scale, self.weight, self.weight_scale, self.bias, out_dtype)
        if epilogue == "gelu_tanh":
            return F.gelu(y, approximate="tanh")
        if epilogue == "gated_residual":
            return ops.gated_residual(residual, gate, y, backend=self.backend)
        return y

    # --- the fast blocks' steps (BlockLinear), fused where fp8 allows ----------------------------------------------
    def reads_fp8_rows(self, x: Tensor) -> bool:
        return self.uses_fp8_activations(x)

    def gelu_in_gemm(self, x: Tensor | FP8Rows) -> bool:
        # weight-only: fp8_linear's epilogue; W8A8: only the Triton GEMM has an epilogue (torch._scaled_mm has none)
        return not isinstance(x, FP8Rows) or self.w8a8_gemm == "triton"

    def after_norm(self, x: Tensor, scale: Tensor, shift: Tensor, backend: str) -> Tensor:
        if self.reads_fp8_rows(x):  # the LN kernel emits the fp8 rows and their scales: no separate quantize pass
            return self(FP8Rows(*ops.modulated_layer_norm_fp8(x, scale, shift, backend=backend), x.dtype))
        return super().after_norm(x, scale, shift, backend)

    def after_residual_norm(self, h: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                            backend: str) -> tuple[Tensor, Tensor | FP8Rows]:
        if self.reads_fp8_rows(h):
            h, x8, x_scale = ops.gated_residual_norm_fp8(h, gate, y, scale, shift, backend=backend)
            return h, FP8Rows(x8, x_scale, h.dtype)
        return super().after_residual_norm(h, gate, y, scale, shift, backend)

    def linear_gelu(self, x: Tensor | FP8Rows) -> Tensor:
        if isinstance(x, FP8Rows):
            return self.forward_fp8(x.x8, x.scale, epilogue="gelu_tanh", out_dtype=x.dtype)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, epilogue="gelu_tanh", backend=self.backend)

    def gated(self, x: Tensor, residual: Tensor, gate: Tensor, backend: str) -> Tensor:
        if self.reads_fp8_rows(x):
            return self._gated_rows(x, None, residual, gate, backend)
        # weight-only (or W8A8 at <= 16 rows, which runs weight-only): the gated residual in the GEMM's epilogue
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, residual=residual, gate=gate,
                              epilogue="gated_residual", backend=self.backend)

    def gated_gelu(self, hidden: Tensor, residual: Tensor, gate: Tensor, backend: str) -> Tensor:
        """residual + gate * self(gelu_tanh(hidden)) for a W8A8 linear (reads_fp8_rows(hidden)): the GELU rides in
        the pass that quantizes hidden's rows, so the 4x-wide activation is not written twice."""
        return self._gated_rows(hidden, 0, residual, gate, backend)

    def gated_attention_mlp(self, attention: Tensor, hidden: Tensor, residual: Tensor, gate: Tensor,
                            backend: str) -> Tensor:
        if self.reads_fp8_rows(residual):
            # the attention goes into hidden's dead v columns, so hidden[..., 2C:] is linear2's input row already:
            # one pass quantizes it, GELU-ing the mlp columns on the way, and no [attention | gelu(mlp)] buffer is
            # ever written
            C = attention.shape[-1]
            hidden[..., 2 * C : 3 * C] = attention
            return self._gated_rows(hidden[..., 2 * C :], C, residual, gate, backend)
        return super().gated_attention_mlp(attention, hidden, residual, gate, backend)

    def _gated_rows(self, x: Tensor, gelu_from: int | None, residual: Tensor, gate: Tensor, backend: str) -> Tensor:
        """W8A8 residual + gate * self(x), x's columns gelu_from: GELU'd in the quantization pass, the gated residual
        in the GEMM's epilogue."""
        x8, x_scale = ops.quantize_rows(x, gelu_from=gelu_from, backend=backend)
        return self.forward_fp8(x8, x_scale, residual=residual, gate=gate, epilogue="gated_residual",
                                out_dtype=x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=e4m3fn, activations={self.activations}")


_BLOCK_LINEAR = re.compile(r"^(double_blocks|single_blocks)\.\d+\.")
_EMBEDDERS = ("img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.")


def _selected(name: str, modulation: bool, embedders: bool, final_layer: bool) -> bool:
    if _BLOCK_LINEAR.match(name):
        return modulation or not name.endswith(("_mod.lin", "modulation.lin"))
    if name.startswith(_EMBEDDERS):
        return embedders
    if name.startswith("final_layer."):
        return final_layer
    return False


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def quantize(model: nn.Module, modulation: bool = True, embedders: bool = False, final_layer: bool = False,
             backend: str = "auto", activations: str = "bf16", w8a8_gemm: str = "scaled_mm") -> dict:
    """Replace the chosen nn.Linear layers of a fluxrt Flux with FP8Linear, in place.

    Default: every linear of the double and single blocks, the modulation linears included (they are 3.2 B of
    FLUX's 11.9 B parameters and run as GEMVs, where fp8 weights halve the bytes read); the embedders and
    the final layer stay in their dtype unless asked. activations="bf16" is weight-only FP8 (any GPU, the
    CPU); "fp8" is dynamic W8A8 (per-token scales; w8a8_gemm "scaled_mm" or "triton"), which needs fp8 tensor
    cores (sm_89+).
    Returns {"layers", "bytes_before", "bytes_after"}.
    """
    if activations == "fp8":
        for device in {p.device for p in model.parameters()}:
            devices.require_fp8_tensor_cores(device, "quantize='fp8' (W8A8)",
                                             "use quantize='fp8-weight' (weight-only FP8) on this GPU")
    before = model_bytes(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _selected(n, modulation, embedders, final_layer)]
    if not names:
        raise ValueError("quantize: no nn.Linear layers selected (already quantized, or not a FLUX transformer?)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), backend=backend, activations=activations,
                                                     w8a8_gemm=w8a8_gemm))
    after = model_bytes(model)
    log.info("quantize: %d linears to fp8 e4m3fn, %.2f GB -> %.2f GB", len(names), before / 1e9, after / 1e9)
    return {"layers": len(names), "bytes_before": before, "bytes_after": after}


def save_transformer(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a fluxrt Flux (quantized or not) as one BFL-named safetensors file, config in the metadata.

    FP8Linear layers are written as `<layer>.weight` (float8_e4m3fn) and `<layer>.scale_weight` (fp32 [N]):
    the Comfy "scaled fp8" naming, which load_transformer reads back into the same FP8Linear."""
    tensors = {}
    for key, value in model.state_dict().items():
        if key.endswith(".weight_scale"):
            key = key[: -len("weight_scale")] + SCALE_SUFFIX
        tensors[key] = value.detach().contiguous()
    config = getattr(model, "params", None)
    metadata = {"format": "pt", "producer": "fluxrt"}
    if config is not None:
        import dataclasses

        metadata["fluxrt_config"] = json.dumps(dataclasses.asdict(config))
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the final name
