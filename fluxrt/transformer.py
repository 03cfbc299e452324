"""The accelerated FLUX transformer, built from fluxrt.ops only (DESIGN.md §2), and fluxrt.compile.

    fast = fluxrt.compile(model)            # model: fluxrt.reference.Flux; same call signature back
    fast.plan                               # what runs where (backend per op, quantization, graphs)

FastFlux reuses the reference model's parameters (no copy) and runs its blocks on the fused ops: modulated
LayerNorm, QK-RMSNorm + RoPE straight into the joint attention layout, joint attention writing the
projection's layout, gated residual fused with the next norm. All 57 modulation linears (3.2 B of FLUX's
11.9 B parameters, GEMVs with M = batch) run as one batched GEMV per step: their weights are concatenated
once and each block's parameters become views into the concatenation, so memory stays one copy.

A diffusers FluxTransformer2DModel is converted (fluxrt.diffusers_adapter) and wrapped so its call stays
diffusers'; a FluxPipeline gets its transformer and VAE replaced in place. On a GPU the step runs through CUDA
graphs (fluxrt.graphs; cuda_graphs="auto"). Autoencoders (reference or diffusers) go to fluxrt.vae.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .graphs import GraphedCall
from .quantize import FP8Linear, quantize as quantize_model, require_fp8_tensor_cores
from .reference.autoencoder import AutoEncoder
from .reference.model import DoubleStreamBlock, Flux, SingleStreamBlock, timestep_embedding

log = logging.getLogger("fluxrt")


def _attention(qkv: Tensor, backend: str, fp8: bool = False) -> Tensor:
    """[3, B, H, S, D] as rope_qk_norm writes it -> [B, S, H*D] as the projection reads it (no transpose copy).
    fp8: e4m3 q, k, v with per-(batch, head) scales (compile(attention="fp8")), the output in qkv's dtype."""
    if fp8:
        q8, k8, vt8, q_scale, k_scale, v_scale = ops.quantize_qkv_fp8(qkv[0], qkv[1], qkv[2])
        return ops.joint_attention_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, out_dtype=qkv.dtype, backend=backend)
    return ops.joint_attention(qkv[0], qkv[1], qkv[2], backend=backend)


def _chunks(mod: Tensor, n: int) -> tuple[Tensor, ...]:
    """[B, n*C] modulation vector -> n views [B, 1, C] (shift, scale, gate, ...)."""
    return mod[:, None, :].chunk(n, dim=-1)


def _is_w8a8(linear: nn.Module, x: Tensor) -> bool:
    return isinstance(linear, FP8Linear) and linear.uses_fp8_activations(x)


def _norm_linear(linear: nn.Module, x: Tensor, scale: Tensor, shift: Tensor, backend: str) -> Tensor:
    """linear(LN(x) * (1 + scale) + shift); for a W8A8 linear the LN kernel emits the fp8 rows and their scales
    itself (no separate quantization pass over the activations)."""
    if _is_w8a8(linear, x):
        x8, x_scale = ops.modulated_layer_norm_fp8(x, scale, shift, backend=backend)
        return linear.forward_fp8(x8, x_scale, out_dtype=x.dtype)
    return linear(ops.modulated_layer_norm(x, scale, shift, backend=backend))


def _gated_down(down: nn.Module, hidden: Tensor, residual: Tensor, gate: Tensor, backend: str) -> Tensor:
    """residual + gate * down(hidden), the gated residual in the GEMM's epilogue where the linear is FP8."""
    if _is_w8a8(down, hidden):
        return down.forward_fp8(*ops.quantize_rows(hidden, backend=backend), residual=residual, gate=gate,
                                epilogue="gated_residual", out_dtype=hidden.dtype)
    if isinstance(down, FP8Linear):  # weight-only (or W8A8 at <= 16 rows, which runs weight-only)
        return ops.fp8_linear(hidden, down.weight, down.weight_scale, down.bias, residual=residual, gate=gate,
                              epilogue="gated_residual", backend=down.backend)
    return ops.gated_residual(residual, gate, down(hidden), backend=backend)


def _attn_then_mlp(mlp: nn.Sequential, h: Tensor, gate1: Tensor, attn_out: Tensor, scale2: Tensor, shift2: Tensor,
                   gate2: Tensor, backend: str) -> Tensor:
    """h += gate1 * attn_out, then h += gate2 * mlp(LN(h) * (1 + scale2) + shift2), the norm fused with the first
    residual. FP8 linears take the GELU-tanh and the second gated residual in their GEMM epilogues, so the
    4x-wide hidden activation is written once; W8A8 gets its input rows already quantized by the norm kernel."""
    up, _, down = mlp
    if _is_w8a8(up, h) and _is_w8a8(down, h):
        h, x8, x_scale = ops.gated_residual_norm_fp8(h, gate1, attn_out, scale2, shift2, backend=backend)
        # the GELU rides in the pass that quantizes the hidden rows for the down projection (in the up GEMM's
        # epilogue instead when that GEMM is Triton's, which has one)
        fused_gelu = up.w8a8_gemm == "triton"
        hidden = up.forward_fp8(x8, x_scale, epilogue="gelu_tanh" if fused_gelu else "none", out_dtype=h.dtype)
        hidden8, hidden_scale = ops.quantize_rows(hidden, gelu_from=None if fused_gelu else 0, backend=backend)
        return down.forward_fp8(hidden8, hidden_scale, residual=h, gate=gate2, epilogue="gated_residual",
                                out_dtype=h.dtype)
    if _is_w8a8(up, h):
        h, x8, x_scale = ops.gated_residual_norm_fp8(h, gate1, attn_out, scale2, shift2, backend=backend)
        hidden = up.forward_fp8(x8, x_scale, epilogue="gelu_tanh", out_dtype=h.dtype)
    else:
        h, x = ops.gated_residual_norm(h, gate1, attn_out, scale2, shift2, backend=backend)
        if isinstance(up, FP8Linear):
            hidden = ops.fp8_linear(x, up.weight, up.weight_scale, up.bias, epilogue="gelu_tanh", backend=up.backend)
        else:
            hidden = _linear_gelu_tanh(up, x)
    return _gated_down(down, hidden, h, gate2, backend)


def _linear_gelu_tanh(linear: nn.Linear, x: Tensor) -> Tensor:
    """gelu_tanh(linear(x)). On CUDA one cuBLASLt GEMM with bias + GELU in its epilogue: torch._addmm_activation
    asks for CUBLASLT_EPILOGUE_GELU_BIAS, the tanh approximation FLUX uses (its non-Lt fallback applies
    gelu(approximate="tanh") too); the 4x-wide output is written once instead of written, read and re-written.
    Not on the CPU, where _addmm_activation applies the exact (erf) GELU."""
    if x.is_cuda and linear.bias is not None:
        y = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


def double_block_forward(block: DoubleStreamBlock, img: Tensor, txt: Tensor, img_mod: Tensor, txt_mod: Tensor,
                         cos: Tensor, sin: Tensor, backend: str = "auto", fp8_attention_rows: bool = True,
                         fp8_attention: bool = False) -> tuple[Tensor, Tensor]:
    """img_mod, txt_mod: the block's modulation outputs [B, 6C] (img_mod.lin / txt_mod.lin of silu(vec)).

    fp8_attention_rows: when both attention projections are W8A8, the attention kernel writes their e4m3 input
    rows itself (scaled by the max |v| bound, kernels/joint_attention.py) instead of bf16 rows that are then
    quantized per token; False keeps the per-token path. fp8_attention: the FP8 attention kernel (its output
    then goes through the projections like a bf16 one)."""
    img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = _chunks(img_mod, 6)
    txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = _chunks(txt_mod, 6)
    img_qkv = _norm_linear(block.img_attn.qkv, img, img_scale1, img_shift1, backend)
    txt_qkv = _norm_linear(block.txt_attn.qkv, txt, txt_scale1, txt_shift1, backend)
    img_norm, txt_norm = block.img_attn.norm, block.txt_attn.norm
    rope_args = (txt_qkv, img_qkv, txt_norm.query_norm.scale, txt_norm.key_norm.scale, img_norm.query_norm.scale,
                 img_norm.key_norm.scale, cos, sin, block.num_heads)
    T = txt.shape[1]
    img_proj, txt_proj = block.img_attn.proj, block.txt_attn.proj
    if fp8_attention_rows and not fp8_attention and _is_w8a8(img_proj, img) and _is_w8a8(txt_proj, txt):
        qkv, v_absmax = ops.rope_qk_norm_joint_v_absmax(*rope_args, backend=backend)
        attn8, row_scale = ops.joint_attention_fp8_out(qkv[0], qkv[1], qkv[2], v_absmax, backend=backend)
        img_attn_out = img_proj.forward_fp8(attn8[:, T:], row_scale[:, T:], out_dtype=img.dtype)
        txt_attn_out = txt_proj.forward_fp8(attn8[:, :T], row_scale[:, :T], out_dtype=txt.dtype)
    else:
        attn = _attention(ops.rope_qk_norm_joint(*rope_args, backend=backend), backend, fp8_attention)
        img_attn_out, txt_attn_out = img_proj(attn[:, T:]), txt_proj(attn[:, :T])

    img = _attn_then_mlp(block.img_mlp, img, img_gate1, img_attn_out, img_scale2, img_shift2, img_gate2, backend)
    txt = _attn_then_mlp(block.txt_mlp, txt, txt_gate1, txt_attn_out, txt_scale2, txt_shift2, txt_gate2, backend)
    return img, txt


def _attention_and_gelu(attn: Tensor, mlp: Tensor, act: nn.GELU) -> Tensor:
    """[attn | act(mlp)] along the last dim, what linear2 reads. Eager: GELU writes its part of the buffer directly,
    so only the narrow attention output is copied in (torch.cat would re-read and re-write the 4x-wide MLP
    activation). Under torch.compile (which rejects a strided `out=`) the cat, which inductor fuses anyway."""
    if torch.compiler.is_compiling():
        return torch.cat((attn, act(mlp)), dim=-1)
    joined = mlp.new_empty(*mlp.shape[:-1], attn.shape[-1] + mlp.shape[-1])
    torch.ops.aten.gelu.out(mlp, approximate=act.approximate, out=joined[..., attn.shape[-1] :])
    joined[..., : attn.shape[-1]] = attn
    return joined


def single_block_forward(block: SingleStreamBlock, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor,
                         backend: str = "auto", fp8_attention: bool = False) -> Tensor:
    """mod: the block's modulation output [B, 3C] (modulation.lin of silu(vec))."""
    shift, scale, gate = _chunks(mod, 3)
    hidden = _norm_linear(block.linear1, x, scale, shift, backend)  # [B, S, 3C + mlp]; qkv read in place
    qkv = ops.rope_qk_norm(hidden[..., : 3 * block.hidden_size], block.norm.query_norm.scale,
                           block.norm.key_norm.scale, cos, sin, block.num_heads, backend=backend)
    C = block.hidden_size
    if _is_w8a8(block.linear2, x):
        # linear2 reads [attention | gelu(mlp)]. hidden's v columns are dead once rope_qk_norm has copied q, k, v
        # out, so the attention output goes there and hidden[..., 2C:] is that row already: one pass quantizes
        # it, GELU-ing the mlp columns on the way, and no bf16 [attention | gelu(mlp)] buffer is ever written.
        hidden[..., 2 * C : 3 * C] = _attention(qkv, backend, fp8_attention)
        x8, x_scale = ops.quantize_rows(hidden[..., 2 * C :], gelu_from=C, backend=backend)
        return block.linear2.forward_fp8(x8, x_scale, residual=x, gate=gate, epilogue="gated_residual",
                                         out_dtype=x.dtype)
    joined = _attention_and_gelu(_attention(qkv, backend, fp8_attention), hidden[..., 3 * C :], block.mlp_act)
    return _gated_down(block.linear2, joined, x, gate, backend)


def _batch_linears(linears: list[nn.Module]) -> nn.Module:
    """One linear computing all of `linears` (same input) at once; theirs become views of its parameters."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or kinds.pop() not in (nn.Linear, FP8Linear):
        raise TypeError(f"cannot batch modulation linears of types {sorted(t.__name__ for t in {type(m) for m in linears})}")
    names = ["weight", "bias"] + (["weight_scale"] if isinstance(linears[0], FP8Linear) else [])
    with torch.no_grad():
        joined = {n: torch.cat([getattr(m, n) for m in linears]) for n in names}
        first = linears[0]
        if isinstance(first, FP8Linear):
            batched = FP8Linear(first.in_features, joined["weight"].shape[0], device="meta", backend=first.backend,
                                activations=first.activations, w8a8_gemm=first.w8a8_gemm)
        else:
            with torch.device("meta"):
                batched = nn.Linear(first.in_features, joined["weight"].shape[0])
        for n, value in joined.items():
            setattr(batched, n, nn.Parameter(value, requires_grad=False))
        offset = 0
        for m in linears:  # re-point each block's parameters into the batched storage: one copy in memory
            rows = m.weight.shape[0]
            for n in names:
                setattr(m, n, nn.Parameter(joined[n][offset : offset + rows], requires_grad=False))
            offset += rows
    return batched


class FastFlux(nn.Module):
    """A fluxrt.reference.Flux run on fluxrt.ops; same forward signature (BFL's) and output."""

    def __init__(self, model: Flux, backend: str = "auto", cuda_graphs: bool = False, attention: str = "bf16"):
        super().__init__()
        self.model = model
        self.backend = backend
        self.fp8_attention = attention == "fp8"
        self.fp8_attention_rows = True  # W8A8: attention writes the projections' fp8 rows (double_block_forward)
        self.graphs = GraphedCall(self._forward) if cuda_graphs else None
        mod_linears = [lin for b in model.double_blocks for lin in (b.img_mod.lin, b.txt_mod.lin)]
        mod_linears += [b.modulation.lin for b in model.single_blocks]
        self.mod_sizes = [lin.weight.shape[0] for lin in mod_linears]
        self.modulation = _batch_linears(mod_linears) if mod_linears else None

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        kwargs = dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y, guidance=guidance)
        if self.graphs is not None and img.is_cuda and not torch.compiler.is_compiling():
            self.model._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)  # errors before capture
            return self.graphs(**kwargs)
        return self._forward(**kwargs)

    def _forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None) -> Tensor:
        m = self.model
        img_ids, txt_ids = m._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img = m.img_in(img)
        vec = m.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if m.params.guidance_embed:
            vec = vec + m.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + m.vector_in(y)
        txt = m.txt_in(txt)
        cos, sin = ops.rope_cos_sin(m.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)))

        mods = iter(self.modulation(F.silu(vec)).split(self.mod_sizes, dim=1)) if self.modulation else iter(())
        for block in m.double_blocks:
            img, txt = double_block_forward(block, img, txt, next(mods), next(mods), cos, sin, self.backend,
                                            self.fp8_attention_rows, self.fp8_attention)
        x = torch.cat((txt, img), dim=1)
        for block in m.single_blocks:
            x = single_block_forward(block, x, next(mods), cos, sin, self.backend, self.fp8_attention)
        return m.final_layer(x[:, txt.shape[1] :], vec)


def compile(obj, quantize: str | None = None, backend: str = "auto", cuda_graphs="auto",
            attention: str = "bf16") -> nn.Module:
    """Accelerate a FLUX transformer; returns a module with the same call signature (see the module docstring).

    quantize: None | "fp8-weight" (FP8 weights, any GPU) | "fp8" (W8A8, sm_89+). The model is modified in place
    (its parameters are reused, batched or quantized, never duplicated): keep using the returned object.
    attention: "bf16" (the model's dtype) | "fp8" (e4m3 q, k, v with per-(batch, head) scales, sm_89+; off by
    default: benchmarks/NOTES.md has its accuracy).
    """
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if quantize not in (None, "fp8", "fp8-weight"):
        raise ValueError(f"quantize must be None, 'fp8' (W8A8) or 'fp8-weight', got {quantize!r}")
    if cuda_graphs not in ("auto", False, True):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if attention not in ("bf16", "fp8"):
        raise ValueError(f"attention must be 'bf16' or 'fp8', got {attention!r}")
    from .diffusers_adapter import (
        FastFluxTransformer,
        flux_from_diffusers,
        is_diffusers_flux,
        is_diffusers_flux_pipeline,
    )

    from .vae import compile_autoencoder, is_diffusers_autoencoder_kl

    if is_diffusers_flux_pipeline(obj):  # its transformer and VAE are replaced in place
        obj.transformer = compile(obj.transformer, quantize=quantize, backend=backend, cuda_graphs=cuda_graphs,
                                  attention=attention)
        obj.vae = compile_autoencoder(obj.vae, backend=backend)
        return obj
    if isinstance(obj, AutoEncoder) or is_diffusers_autoencoder_kl(obj):
        for name, value, default in (("quantize", quantize, None), ("attention", attention, "bf16")):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to the transformer; the autoencoder runs in its own dtype")
        return compile_autoencoder(obj, backend=backend)
    diffusers_config = None
    if is_diffusers_flux(obj):
        diffusers_config = obj.config
        obj = flux_from_diffusers(obj)
    elif not isinstance(obj, Flux):
        raise TypeError(f"fluxrt.compile accepts a fluxrt.reference.Flux or AutoEncoder, a diffusers "
                        f"FluxTransformer2DModel, AutoencoderKL or FluxPipeline; got {type(obj).__name__}")
    device = next(obj.parameters()).device
    if quantize == "fp8":
        require_fp8_tensor_cores(device)
    if attention == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"attention='fp8' needs fp8 tensor cores (sm_89+); {torch.cuda.get_device_name(device)} "
                           "has none: use attention='bf16'")
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    graphs = device.type == "cuda" if cuda_graphs == "auto" else cuda_graphs
    if quantize is not None:
        quantize_model(obj, backend=backend, activations="fp8" if quantize == "fp8" else "bf16")
    fast = FastFlux(obj, backend=backend, cuda_graphs=graphs, attention=attention)
    kernels = "triton" if backend == "triton" or (backend == "auto" and device.type == "cuda") else "torch"
    fast.plan = {
        "device": str(device),
        "ops": {op: kernels for op in ("modulated_layer_norm", "gated_residual_norm", "gated_residual",
                                        "rope_qk_norm", "joint_attention")},
        "linears": {None: "torch (bf16/fp32)", "fp8-weight": f"fp8 weight-only ({kernels})",
                    "fp8": "fp8 W8A8 (torch._scaled_mm; rows quantized in the norm kernels, attention output rows "
                           "in the attention kernel; <= 16 rows weight-only)"}[quantize],
        "modulation": f"{len(fast.mod_sizes)} linears batched into one GEMV",
        "attention": "fp8 (e4m3 q, k, v; per-(batch, head) scales)" if attention == "fp8" else "model dtype",
        "mlp_gelu": {None: "in the cuBLASLt GEMM epilogue" if device.type == "cuda" else "separate op (CPU)",
                     "fp8-weight": "in the fp8 GEMM's epilogue",
                     "fp8": "separate op after torch._scaled_mm (in the epilogue with w8a8_gemm='triton')"}[quantize],
        "cuda_graphs": f"on (one graph per input shape, up to {fast.graphs.max_graphs} kept)" if graphs else "off",
    }
    log.info("fluxrt.compile plan: %s", fast.plan)
    return fast if diffusers_config is None else FastFluxTransformer(fast, diffusers_config)
