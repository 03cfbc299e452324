"""The accelerated FLUX transformer (FastFlux), built from fluxrt.ops only (DESIGN.md §2).

    fast = fluxrt.compile(model)            # fluxrt.compiler: checks, converts, then builds a FastFlux
    fast.plan                               # what runs where (backend per op, quantization, graphs, last call)

FastFlux reuses the reference model's parameters (no copy) and runs its blocks on the fused ops: modulated
LayerNorm, QK-RMSNorm + RoPE straight into the joint attention layout, joint attention writing the
projection's layout, gated residual fused with the next norm. All 57 modulation linears (3.2 B of FLUX's
11.9 B parameters, GEMVs with M = batch) run as one batched GEMV per step: their weights are concatenated
once and each block's parameters become views into the concatenation, so memory stays one copy (also
after `.to(device or dtype)`: FastFlux._apply).

The block code reads like BFL's forward: each linear is called through the steps of fluxrt.quantize.BlockLinear
(after_norm, after_residual_norm, linear_gelu, gated, ...), which FP8Linear fuses further than a plain linear does
(norms emitting fp8 rows, GELU and gated residuals in GEMM epilogues). On a GPU the step runs through CUDA graphs
(fluxrt.graphs).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cache, cache_graphs, ops, parallel
from .convert import CheckpointError
from .graphs import GraphedCall
from .lora_branch import LoraBranches, LoraLinear, attach, branch_of, branched_linears, call_linear
from .quantize import BlockLinear, FP8Linear, FP8Rows
from .reference.model import DoubleStreamBlock, Flux, SingleStreamBlock, timestep_embedding

log = logging.getLogger("fluxrt")


def _attention(qkv: Tensor, backend: str, fp8: bool = False) -> Tensor:
    """[3, B, H, S, D] as rope_qk_norm writes it -> [B, S, H*D] as the projection reads it (no transpose copy).
    fp8: e4m3 q, k, v with per-(batch, head) scales (compile(attention="fp8")), the output in qkv's dtype."""
    if fp8:
        q8, k8, vt8, q_scale, k_scale, v_scale = ops.quantize_qkv_fp8(qkv[0], qkv[1], qkv[2])
        return ops.joint_attention_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, out_dtype=qkv.dtype, backend=backend)
    return ops.joint_attention(qkv[0], qkv[1], qkv[2], backend=backend)


Attend = Callable[[Tensor], Tensor]


def _chunks(mod: Tensor, n: int) -> tuple[Tensor, ...]:
    """[B, n*C] modulation vector -> n views [B, 1, C] (shift, scale, gate, ...)."""
    return mod[:, None, :].chunk(n, dim=-1)


class PlainLinear(BlockLinear):
    """An unquantized nn.Linear as the fast blocks call it (BlockLinear's plain steps; GELU in cuBLASLt's epilogue)."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def linear_gelu(self, x: Tensor) -> Tensor:
        return _linear_gelu_tanh(self.linear, x)


def block_linear(module: nn.Module, lora_scales: Tensor | None = None, backend: str = "auto") -> BlockLinear:
    """The module as the fast blocks call it; with its LoRA side branch when it has one and lora_scales (the
    per-image adapter scales, LoraBranches.row_scales) are given."""
    base = module if isinstance(module, BlockLinear) else PlainLinear(module)
    branch = branch_of(module)
    return base if branch is None or lora_scales is None else LoraLinear(base, branch, lora_scales, backend)


def _linear_gelu_tanh(linear: nn.Linear, x: Tensor) -> Tensor:
    """gelu_tanh(linear(x)). On CUDA one cuBLASLt GEMM with bias + GELU in its epilogue: torch._addmm_activation
    asks for CUBLASLT_EPILOGUE_GELU_BIAS, the tanh approximation FLUX uses (its non-Lt fallback applies
    gelu(approximate="tanh") too); the 4x-wide output is written once instead of written, read and re-written.
    Not on the CPU, where _addmm_activation applies the exact (erf) GELU."""
    if x.is_cuda and linear.bias is not None:
        y = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


def _mlp_after_attention(mlp: nn.Sequential, h: Tensor, gate1: Tensor, attn_out: Tensor, scale2: Tensor,
                         shift2: Tensor, gate2: Tensor, backend: str, lora_scales: Tensor | None = None) -> Tensor:
    """h += gate1 * attn_out, then h += gate2 * mlp(LN(h) * (1 + scale2) + shift2): the norm fused with the first
    residual, the second residual with the down projection."""
    up, down = block_linear(mlp[0], lora_scales, backend), block_linear(mlp[2], lora_scales, backend)
    h, x = up.after_residual_norm(h, gate1, attn_out, scale2, shift2, backend)
    if up.gelu_in_gemm(x) or not down.reads_fp8_rows(h):
        return down.gated(up.linear_gelu(x), h, gate2, backend)
    # an up GEMM without an epilogue before a down projection that quantizes its input rows: the GELU rides in that
    # quantization pass, so the 4x-wide hidden activation is written once
    return down.gated_gelu(up(x), h, gate2, backend)


def double_block_forward(block: DoubleStreamBlock, img: Tensor, txt: Tensor, img_mod: Tensor, txt_mod: Tensor,
                         cos: Tensor, sin: Tensor, backend: str = "auto", fp8_attention_rows: bool = True,
                         fp8_attention: bool = False, lora_scales: Tensor | None = None,
                         attend: Attend | None = None) -> tuple[Tensor, Tensor]:
    """img_mod, txt_mod: the block's modulation outputs [B, 6C] (img_mod.lin / txt_mod.lin of silu(vec)).

    fp8_attention_rows: when both attention projections read fp8 rows (W8A8), the attention kernel writes their
    e4m3 input rows itself (scaled by the max |v| bound, kernels/joint_attention.py) instead of bf16 rows that are
    then quantized per token; False keeps the per-token path. fp8_attention: the FP8 attention kernel (its output
    then goes through the projections like a bf16 one). lora_scales: the per-image LoRA adapter scales
    (fluxrt.lora_branch), None when no side branch runs. attend(qkv) -> [B, S, H*D]: the joint attention of the
    normed, RoPE'd [3, B, H, S, D] (default: the joint_attention op; fluxrt.parallel's sharded attention)."""
    img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = _chunks(img_mod, 6)
    txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = _chunks(txt_mod, 6)

    def linear(module: nn.Module) -> BlockLinear:
        return block_linear(module, lora_scales, backend)

    img_qkv = linear(block.img_attn.qkv).after_norm(img, img_scale1, img_shift1, backend)
    txt_qkv = linear(block.txt_attn.qkv).after_norm(txt, txt_scale1, txt_shift1, backend)
    img_norm, txt_norm = block.img_attn.norm, block.txt_attn.norm
    rope_args = (txt_qkv, img_qkv, txt_norm.query_norm.scale, txt_norm.key_norm.scale, img_norm.query_norm.scale,
                 img_norm.key_norm.scale, cos, sin, block.num_heads)
    T = txt.shape[1]
    img_proj, txt_proj = linear(block.img_attn.proj), linear(block.txt_attn.proj)
    if (attend is None and fp8_attention_rows and not fp8_attention and img_proj.reads_fp8_rows(img)
            and txt_proj.reads_fp8_rows(txt)):
        qkv, v_absmax = ops.rope_qk_norm_joint_v_absmax(*rope_args, backend=backend)
        attn8, row_scale = ops.joint_attention_fp8_out(qkv[0], qkv[1], qkv[2], v_absmax, backend=backend)
        img_attn_out = img_proj(FP8Rows(attn8[:, T:], row_scale[:, T:], img.dtype))
        txt_attn_out = txt_proj(FP8Rows(attn8[:, :T], row_scale[:, :T], txt.dtype))
    else:
        qkv = ops.rope_qk_norm_joint(*rope_args, backend=backend)
        attn = _attention(qkv, backend, fp8_attention) if attend is None else attend(qkv)
        img_attn_out, txt_attn_out = img_proj(attn[:, T:]), txt_proj(attn[:, :T])

    img = _mlp_after_attention(block.img_mlp, img, img_gate1, img_attn_out, img_scale2, img_shift2, img_gate2, backend,
                               lora_scales)
    txt = _mlp_after_attention(block.txt_mlp, txt, txt_gate1, txt_attn_out, txt_scale2, txt_shift2, txt_gate2, backend,
                               lora_scales)
    return img, txt


def single_block_forward(block: SingleStreamBlock, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor,
                         backend: str = "auto", fp8_attention: bool = False,
                         lora_scales: Tensor | None = None, attend: Attend | None = None) -> Tensor:
    """mod: the block's modulation output [B, 3C] (modulation.lin of silu(vec)); lora_scales and attend as
    double_block_forward's."""
    shift, scale, gate = _chunks(mod, 3)
    hidden = block_linear(block.linear1, lora_scales, backend).after_norm(x, scale, shift, backend)  # [B, S, 3C + mlp]; qkv read in place
    qkv = ops.rope_qk_norm(hidden[..., : 3 * block.hidden_size], block.norm.query_norm.scale,
                           block.norm.key_norm.scale, cos, sin, block.num_heads, backend=backend)
    attention = _attention(qkv, backend, fp8_attention) if attend is None else attend(qkv)
    return block_linear(block.linear2, lora_scales, backend).gated_attention_mlp(attention, hidden, x, gate, backend)


def _concatenation(parts: list[Tensor]) -> Tensor:
    """torch.cat(parts) along dim 0; when the parts already lie back to back in one storage (the views a previous
    compile of this model made), the view spanning them instead: compiling a model again must not leave a second
    copy of its batched modulation weights (6.4 GB at FLUX's size in bf16)."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        adjacent = (part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                    and part.storage_offset() == offset and part.is_contiguous() and part.dtype == first.dtype
                    and part.shape[1:] == first.shape[1:])
        if not adjacent:
            return torch.cat(parts)
        offset += part.numel()
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _batch_linears(linears: list[nn.Module]) -> nn.Module:
    """One linear computing all of `linears` (same input) at once; theirs become views of its parameters."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or kinds.pop() not in (nn.Linear, FP8Linear):
        raise TypeError(f"cannot batch modulation linears of types {sorted(t.__name__ for t in {type(m) for m in linears})}")
    names = ["weight", "bias"] + (["weight_scale"] if isinstance(linears[0], FP8Linear) else [])
    with torch.no_grad():
        joined = {n: _concatenation([getattr(m, n) for m in linears]) for n in names}
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


def row_slice(linear: nn.Module, start: int, stop: int) -> nn.Module:
    """A linear computing rows [start, stop) of `linear`'s output (nn.Linear or FP8Linear), its parameters views of
    the rows (no copy). Built per call: cheap, and it can never point at weights a .to() has since replaced."""
    if isinstance(linear, FP8Linear):
        part = FP8Linear(linear.in_features, stop - start, bias=linear.bias is not None, device="meta",
                         backend=linear.backend, activations=linear.activations, w8a8_gemm=linear.w8a8_gemm)
    else:
        with torch.device("meta"):
            part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None)
    for name, param in linear.named_parameters(recurse=False):
        setattr(part, name, nn.Parameter(param.detach()[start:stop], requires_grad=False))
    return part


def _modulation_linears(model: Flux) -> list[tuple[str, nn.Module]]:
    names = [f"double_blocks.{i}.{s}_mod.lin" for i in range(len(model.double_blocks)) for s in ("img", "txt")]
    names += [f"single_blocks.{i}.modulation.lin" for i in range(len(model.single_blocks))]
    return [(name, model.get_submodule(name)) for name in names]


def _block_linears(model: Flux) -> list[tuple[str, nn.Module]]:
    """The linears FastFlux calls itself (through BlockLinear), the modulation linears excepted."""
    names = [f"double_blocks.{i}.{s}_{part}" for i in range(len(model.double_blocks)) for s in ("img", "txt")
             for part in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    names += [f"single_blocks.{i}.{lin}" for i in range(len(model.single_blocks)) for lin in ("linear1", "linear2")]
    return [(name, model.get_submodule(name)) for name in names]


def refuse_offloaded_weights(fast: FastFlux, args: tuple = ()) -> None:
    """FastFlux's forward pre-hook (and a check for any module running a FastFlux's blocks). accelerate's sequential
    CPU offload keeps each layer's weights on the meta device except during that layer's own forward; FastFlux reads
    weights directly (norm scales, batched modulation, fused epilogues), so it would compute on empty tensors (NaN
    on a GPU). Refuse before reading any."""
    if fast.model.img_in.weight.is_meta:
        raise RuntimeError(
            "the compiled transformer's weights are on the meta device, as accelerate's sequential CPU offload "
            "(pipe.enable_sequential_cpu_offload()) leaves them outside each layer's own forward; fluxrt reads the "
            "weights directly, so it cannot run that way. Call pipe.remove_all_hooks(), then "
            "pipe.enable_model_cpu_offload() (whole-model offload works with fluxrt) or pipe.to(device)")


def check_compilable(model: Flux, quantize: str | None) -> None:
    """Raise before anything is changed if FastFlux could not run `model` (quantized first as `quantize` asks):
    parameters on one device, of one floating dtype (an FP8Linear's fp8 weights and fp32 scales aside), every block
    linear an nn.Linear or FP8Linear (FastFlux calls their weights itself, so a wrapper such as an unfused LoRA
    layer would be skipped silently)."""
    params = dict(model.named_parameters())
    if any(p.is_meta for p in params.values()):
        raise CheckpointError("the model has meta (empty) parameters: load its weights before fluxrt.compile")
    devices = sorted({str(p.device) for p in params.values()})
    if len(devices) != 1:
        raise CheckpointError(f"the model's parameters are on several devices ({', '.join(devices)}): move it to one "
                              "(model.to(device)) before fluxrt.compile")
    fp8_storage = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, FP8Linear)
                   for p in ("weight", "weight_scale")}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, p in params.items():
        if name not in fp8_storage:
            by_dtype.setdefault(p.dtype, []).append(name)
    if len(by_dtype) != 1 or not next(iter(by_dtype)).is_floating_point:
        shown = "; ".join(f"{dtype}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                          for dtype, names in by_dtype.items())
        raise CheckpointError(f"the model's parameters must share one floating dtype, found {shown}: cast the model "
                              "to one dtype (model.to(torch.bfloat16)) before quantizing and compiling it")
    for name, module in _modulation_linears(model) + _block_linears(model):
        if type(module) is not nn.Linear and not isinstance(module, FP8Linear):
            raise CheckpointError(f"{name} is a {type(module).__name__}, not an nn.Linear or FP8Linear: fluxrt.compile "
                                  "runs the blocks' linears itself and would skip what that module adds (an unfused "
                                  "LoRA: fuse it into the weights first)")
    kinds = {FP8Linear if quantize is not None else type(m) for _, m in _modulation_linears(model)}
    if len(kinds) > 1:
        raise CheckpointError("the modulation linears mix nn.Linear and FP8Linear, which cannot run as one batched "
                              "GEMV: quantize all of them (fluxrt.quantize.quantize(model)) or none")


def _linears_description(model: Flux, kernels: str) -> str:
    """What the blocks' linears are, from the model itself (it may have been quantized before compile)."""
    kinds = set()
    for _, m in _block_linears(model):
        if not isinstance(m, FP8Linear):
            kinds.add("torch (bf16/fp32)")
        elif m.activations == "bf16":
            kinds.add(f"fp8 weight-only ({kernels})")
        elif m.w8a8_gemm == "triton":
            kinds.add("fp8 W8A8 (Triton fp8 GEMM, epilogues fused; rows quantized in the norm kernels, attention "
                      "output rows in the attention kernel; <= 16 rows weight-only)")
        else:
            kinds.add("fp8 W8A8 (torch._scaled_mm; rows quantized in the norm kernels, attention output rows in the "
                      "attention kernel; <= 16 rows weight-only)")
    return " + ".join(sorted(kinds))


class FastFlux(nn.Module):
    """A fluxrt.reference.Flux run on fluxrt.ops; same forward signature (BFL's) and output.

    `plan` says what runs where; plan["last_call"] is what the last call actually ran ({op: sorted backends}, from
    fluxrt.ops.trace; None before the first call). A CUDA graph replay runs no Python and records nothing, so on a
    GPU with graphs on it is the record of the last eager call or graph capture."""

    def __init__(self, model: Flux, backend: str = "auto", cuda_graphs: bool = False, attention: str = "bf16",
                 parallel: "parallel.Mesh | None" = None):
        super().__init__()
        if parallel is not None and (cuda_graphs or attention == "fp8"):
            raise ValueError("context parallelism runs without CUDA graphs and with attention='bf16' (its collectives "
                             "run eagerly, its attention blocks through ops.attention_lse): pass cuda_graphs=False "
                             "and attention='bf16'")
        self.model = model
        self.parallel = parallel  # a fluxrt.parallel.Mesh: run on this rank's shard of the sequence
        self.cache = None  # a fluxrt.cache config for calls without cache_states (compile(cache=...))
        self._own_cache = cache.Trajectory()  # the states of calls without cache_states
        self.last_cache_states: list = []
        self._stage_graphs: dict | None = None  # fluxrt.cache_graphs: a cached call's stages, captured on first use
        self.backend = backend
        self.fp8_attention = attention == "fp8"
        self.fp8_attention_rows = True  # W8A8: attention writes the projections' fp8 rows (double_block_forward)
        self.graphs = GraphedCall(self._forward, weights=self._graph_weights) if cuda_graphs else None
        mod_linears = [lin for _, lin in _modulation_linears(model)]
        self.mod_sizes = [lin.weight.shape[0] for lin in mod_linears]
        self.modulation = _batch_linears(mod_linears) if mod_linears else None
        self.lora: LoraBranches | None = None  # enable_lora_branches
        self.plan = self._describe()
        self.register_forward_pre_hook(refuse_offloaded_weights)

    def _graph_weights(self) -> Iterator[Tensor]:
        """Every tensor a captured CUDA graph reads from the model (fluxrt.graphs drops graphs when they change),
        the LoRA side branches' buffers excepted: they are written in place on purpose (a hot-swap), their addresses
        never change, and a replay reads their contents as they are then."""
        lora = set() if self.lora is None else {id(t) for t in self.lora.buffers()}
        return (t for t in itertools.chain(self.parameters(), self.buffers()) if id(t) not in lora)

    def enable_lora_branches(self, max_rank: int = 64, max_adapters: int = 4) -> LoraBranches:
        """Reserve every linear's LoRA side branch (fluxrt.lora_branch): padded to max_rank columns per layer, shared
        by up to max_adapters loaded LoRAs. Once per model: from then on loading, swapping and rescaling LoRAs
        (self.lora) changes buffer contents only. Memory: max_rank x (in + out) per linear in the activations'
        dtype (about 0.6 GB in bf16 for FLUX.1-dev at rank 64)."""
        if self.lora is not None:
            if (self.lora.max_rank, self.lora.max_adapters) != (max_rank, max_adapters):
                raise ValueError(f"the LoRA branches are enabled already with max_rank={self.lora.max_rank}, "
                                 f"max_adapters={self.lora.max_adapters}; they cannot be resized (shapes stay fixed "
                                 "so that nothing recompiles): compile the model again to change them")
            return self.lora
        linears = branched_linears(self.model)
        self.lora = LoraBranches(linears, max_rank, max_adapters, self._activation_dtype(), self.model.img_in.bias.device)
        attach(self.model, self.lora)
        self._mod_branches = [branch_of(lin) for _, lin in _modulation_linears(self.model)]
        self._refresh_plan()
        return self.lora

    def shard(self, mesh: "parallel.Mesh | None") -> "FastFlux":
        """Run context-parallel from now on (fluxrt.parallel): each call on this rank's shard of the sequence; None:
        on this device alone again. CUDA graphs go off (the collectives run eagerly) and stay off. Returns self."""
        if mesh is not None and self.fp8_attention:
            raise ValueError("context parallelism runs attention='bf16': compile the model without attention='fp8'")
        self.parallel, self.graphs, self._stage_graphs = mesh, None, None
        self._refresh_plan()
        return self

    def compile_stats(self) -> dict:
        """What has been (re)compiled or (re)captured so far, to check that LoRA swaps and scale changes cost none:
        torch._dynamo's counters (process-wide: every torch.compile'd function of this process) and this model's
        CUDA graph cache (captures, invalidations by a weights change, evictions, replays; None with graphs off)."""
        from torch._dynamo.utils import counters

        return {
            "dynamo": {"unique_graphs": counters["stats"]["unique_graphs"], "frames_compiled": counters["frames"]["ok"]},
            "cuda_graphs": None if self.graphs is None else dict(self.graphs.cache.stats),
            "cache_stage_graphs": {name: dict(graph.cache.stats) for name, graph in (self._stage_graphs or {}).items()},
        }

    def _activation_dtype(self) -> torch.dtype:
        """The dtype activations run in: the model's, also when its linears hold FP8 weights."""
        return self.model.img_in.bias.dtype

    def _apply(self, fn, recurse: bool = True):
        """nn.Module.to / .cuda / .double / ... convert each parameter on its own, which would turn the blocks'
        modulation views into separate copies of the batched weights (+27 % parameter memory, 6.4 GB at FLUX's size
        in bf16). The views are taken out while the rest converts (nn.Module._apply skips None entries), then
        re-pointed into the converted batched weights: one storage, as compile left it. A dtype change that would
        cast FP8 weights (.to(torch.bfloat16), .half(), ...) is refused before anything converts."""
        self._refuse_fp8_recast(fn)
        linears = [lin for _, lin in _modulation_linears(self.model)] if self.modulation is not None else []
        names = [name for name, _ in self.modulation.named_parameters(recurse=False)] if linears else []
        for linear in linears:
            for name in names:
                linear._parameters[name] = None
        try:
            super()._apply(fn, recurse)
        finally:  # also after a failed conversion: the views then point into whatever the batched weights are now
            self._view_modulation(linears, names)
        self._refresh_plan()
        return self

    def _refuse_fp8_recast(self, fn) -> None:
        """ValueError if `fn` (what nn.Module._apply maps over the tensors) changes an FP8 weight's dtype: FP8Linear
        would then hold bf16/fp16 weights with fp8 scales, and every output would be wrong."""
        for name, module in self.model.named_modules():
            if isinstance(module, FP8Linear):
                probe = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
                converted = fn(probe)
                if converted.dtype != probe.dtype:
                    raise ValueError(f"this model is quantized (FP8 weights, e.g. {name}), so its dtype cannot change "
                                     f"to {converted.dtype}: move it with .to(device) only, or compile the "
                                     "unquantized model in the dtype you want")
                return  # one probe says it for every FP8 weight (they share a dtype and device)

    def _view_modulation(self, linears: list[nn.Module], names: list[str]) -> None:
        """Each block's modulation parameters become views of its rows of the batched weights."""
        offset = 0
        for linear, rows in zip(linears, self.mod_sizes):
            for name in names:
                batched = getattr(self.modulation, name).detach()
                linear._parameters[name] = nn.Parameter(batched[offset : offset + rows], requires_grad=False)
            offset += rows

    def _refresh_plan(self) -> None:
        """The plan describes the device and dtype the model is on now (in place: wrappers share the dict)."""
        fresh = self._describe()
        fresh["last_call"] = self.plan["last_call"]
        self.plan.update(fresh)

    def _describe(self) -> dict:
        device = self.model.img_in.weight.device
        on_triton = self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")
        kernels = "triton" if on_triton else "torch"
        quantized = [m for _, m in _block_linears(self.model) if isinstance(m, FP8Linear)]
        if not quantized:
            gelu = "in the cuBLASLt GEMM epilogue" if device.type == "cuda" else "separate op (CPU)"
        elif all(m.activations == "bf16" for m in quantized):
            gelu = "in the fp8 GEMM's epilogue"
        else:
            gelu = "separate op after torch._scaled_mm (in the epilogue with w8a8_gemm='triton')"
        return {
            "device": str(device),
            "ops": {op: kernels for op in ("modulated_layer_norm", "gated_residual_norm", "gated_residual",
                                            "rope_qk_norm", "joint_attention")},
            "linears": _linears_description(self.model, kernels),
            "modulation": f"{len(self.mod_sizes)} linears batched into one GEMV",
            "attention": "fp8 (e4m3 q, k, v; per-(batch, head) scales)" if self.fp8_attention else "model dtype",
            "mlp_gelu": gelu,
            "lora": ("fused into the weights, if any (fluxrt.lora)" if self.lora is None else
                     f"side branches on {len(self.lora.shapes)} linears: padded rank {self.lora.max_rank}, "
                     f"{self.lora.max_adapters} adapter slots (fluxrt.lora_branch)"),
            "cuda_graphs": (f"on (one graph per input shape, up to {self.graphs.max_graphs} kept)" if self.graphs
                            else "off"),
            "parallel": None if self.parallel is None else self.parallel.describe(),
            "cache": None if self.cache is None else self.cache.spec(),
            "cache_graphs": ("staged (fluxrt.cache_graphs): first / rest / final graphs per input signature, the FBC "
                             "skip tail eager, rows that disagree eager" if self.graphs else "off"),
            "last_call": None,
        }

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, controlnet_block_samples=None, controlnet_single_block_samples=None,
                controlnet_blocks_repeat: bool = False, lora_scales: Tensor | None = None,
                cache_states: list | None = None) -> Tensor:
        """BFL's forward; the controlnet_* arguments are a ControlNet's residuals with diffusers' meaning
        (controlnet_residuals). A call with residuals runs eagerly, not through a CUDA graph. lora_scales
        [B, max_adapters]: each image's scale per LoRA slot (self.lora.per_image_scales), with the side branches
        enabled; None: the loaded LoRAs at their scales. cache_states: one fluxrt.cache.ImageCache (or None) per
        image, for step caching; None: the model's own (compile(cache=...)), if any. Every argument is checked before
        any state (cache, graphs, plan) changes."""
        self.model._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        kwargs = dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y, guidance=guidance)
        if lora_scales is not None:
            if self.lora is None:
                raise ValueError("lora_scales needs the LoRA side branches: call enable_lora_branches() and load LoRAs "
                                 "first")
            self.lora.check_per_image(lora_scales, img.shape[0])
            kwargs["lora_scales"] = lora_scales
        residuals = controlnet_residuals(self.model, img, controlnet_block_samples, controlnet_single_block_samples,
                                         controlnet_blocks_repeat)
        if residuals is not None and self.parallel is not None:
            raise ValueError("ControlNet residuals are not supported with context parallelism (they are whole-sequence "
                             "tensors): run the ControlNet pipeline on one GPU")
        if residuals is not None:
            kwargs["residuals"] = residuals
        if cache_states is not None or self.cache is not None:
            if residuals is not None or self.parallel is not None:
                raise ValueError("step caching does not run with ControlNet residuals or context parallelism; leave "
                                 "cache off for this call")
            self._check_cache_states(cache_states, img.shape[0])
            cache_states = self._cache_states(cache_states, img.shape[0], timesteps)  # checks passed: record them
        if cache_states is not None:
            kwargs["cache_states"] = cache_states
        if torch.compiler.is_compiling():  # traced into a graph: nothing is recorded at run time
            return self._forward(**kwargs)
        with ops.trace() as ran:
            if self.graphs is not None and img.is_cuda and residuals is None:
                out = self.graphs(**kwargs) if cache_states is None else cache_graphs.run(self, **kwargs)
            else:
                out = self._forward(**kwargs)
        if ran:  # empty for a graph replay: keep the capture's record
            self.plan["last_call"] = {op: sorted(backends) for op, backends in ran.backends().items()}
        return out

    def _forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None, residuals: "ControlNetResiduals | None" = None,
                 lora_scales: Tensor | None = None, cache_states: list | None = None) -> Tensor:
        if self.parallel is not None:
            m = self.model
            img_ids, txt_ids = m._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
            return self._forward_sharded(img, img_ids, txt, txt_ids, timesteps, y, guidance, self.row_scales(
                img.shape[0], lora_scales))
        img, txt, vec, mods, cos, sin, row_scales = self.head(img, img_ids, txt, txt_ids, timesteps, y, guidance,
                                                              lora_scales)
        if cache_states is not None:
            img = cache.run_blocks_cached(self, img, txt, mods, cos, sin, cache_states, row_scales)
        else:
            img = self.run_blocks(img, txt, mods, cos, sin, after_block=residuals, lora_scales=row_scales)
        return self._final_layer(img, vec, row_scales)

    def row_scales(self, batch: int, lora_scales: Tensor | None) -> Tensor | None:
        """The LoRA side branches' per-image adapter scales for a call (None without branches)."""
        return None if self.lora is None else self.lora.row_scales(batch, lora_scales)

    def head(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
             guidance: Tensor | None, lora_scales: Tensor | None = None) -> tuple:
        """What runs before the blocks: the inputs checked, the token embedders and the conditioning ->
        (img, txt, vec, mods, cos, sin, row_scales)."""
        m = self.model
        img_ids, txt_ids = m._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        row_scales = self.row_scales(img.shape[0], lora_scales)
        img, txt = self._linear(m.img_in, img, row_scales), self._linear(m.txt_in, txt, row_scales)
        vec, mods, cos, sin = self.conditioning(timesteps, y, guidance, txt_ids, img_ids, img.dtype, row_scales)
        return img, txt, vec, mods, cos, sin, row_scales

    @staticmethod
    def _check_cache_states(given: list | None, batch: int) -> None:
        if given is not None and (not isinstance(given, (list, tuple)) or len(given) != batch or not all(
                s is None or isinstance(s, cache.ImageCache) for s in given)):
            raise ValueError(f"cache_states must be a list of {batch} fluxrt.cache.ImageCache (or None), one per image; "
                             "make them with fluxrt.cache.states(config, batch)")

    def _cache_states(self, given: list | None, batch: int, timesteps: Tensor) -> list | None:
        """The call's per-image cache states: given (checked), or the model's own for compile(cache=...) (new ones
        when a new trajectory starts: the batch changed, or the timestep is not below the last call's). None when no
        image caches."""
        if given is None and self.cache is not None:
            given = self._own_cache.states_for(self.cache, batch, timesteps)
        if given is None:
            return None
        self.last_cache_states = list(given)
        return None if all(s is None for s in given) else list(given)

    @property
    def cache_stats(self) -> list[dict | None]:
        """Per image of the last cached call: {"computed": steps, "skipped": steps} so far in its trajectory (None for
        an image without cache)."""
        return [None if s is None else dict(s.stats) for s in self.last_cache_states]

    def _forward_sharded(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                         y: Tensor, guidance: Tensor | None, row_scales: Tensor | None) -> Tensor:
        """_forward on this rank's shard of the joint sequence (fluxrt.parallel): the same blocks, the sharded
        attention, every rank's image rows gathered at the end."""
        m = self.model
        shards = parallel.Shards(txt.shape[1], img.shape[1], self.parallel, img.device)
        img = self._linear(m.img_in, shards.take(img, "image"), row_scales)
        txt = self._linear(m.txt_in, shards.take(txt, "text"), row_scales)
        vec, mods, cos, sin = self.conditioning(timesteps, y, guidance, shards.take(txt_ids, "text"),
                                                shards.take(img_ids, "image"), img.dtype, row_scales)

        def attend(qkv: Tensor) -> Tensor:
            return parallel.fused_attention(qkv, shards.keys, self.parallel, self.backend)

        img = self.run_blocks(img, txt, mods, cos, sin, lora_scales=row_scales, attend=attend)
        return shards.gather_image(self._final_layer(img, vec, row_scales))

    def _final_layer(self, img: Tensor, vec: Tensor, row_scales: Tensor | None) -> Tensor:
        m = self.model
        if row_scales is None:
            return m.final_layer(img, vec)
        # LastLayer's forward (fluxrt.reference.model), its two linears with their side branches
        final = m.final_layer
        shift, scale = self._linear(final.adaLN_modulation[1], F.silu(vec), row_scales).chunk(2, dim=1)
        return self._linear(final.linear, (1 + scale[:, None, :]) * final.norm_final(img) + shift[:, None, :],
                            row_scales)

    def _linear(self, module: nn.Module, x: Tensor, row_scales: Tensor | None) -> Tensor:
        return call_linear(module, x, row_scales, self.backend)

    def _embed(self, embedder: nn.Module, x: Tensor, row_scales: Tensor | None) -> Tensor:
        """MLPEmbedder's forward (fluxrt.reference.model), its linears with their side branches."""
        hidden = F.silu(self._linear(embedder.in_layer, x, row_scales))
        return self._linear(embedder.out_layer, hidden, row_scales)

    def time_vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, dtype: torch.dtype,
                    row_scales: Tensor | None = None) -> Tensor:
        """vec [B, C]: the timestep, guidance and pooled-text embeddings summed (what the modulations and the final
        layer read)."""
        m = self.model
        vec = self._embed(m.time_in, timestep_embedding(timesteps, 256).to(dtype), row_scales)
        if m.params.guidance_embed:
            vec = vec + self._embed(m.guidance_in, timestep_embedding(guidance, 256).to(dtype), row_scales)
        return vec + self._embed(m.vector_in, y, row_scales)

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, txt_ids: Tensor, img_ids: Tensor,
                     dtype: torch.dtype, row_scales: Tensor | None = None) -> tuple[Tensor, list[Tensor], Tensor,
                                                                                      Tensor]:
        """What every block reads besides the token streams: vec [B, C], the blocks' modulation vectors (in block
        order, from one batched GEMV, plus each one's LoRA side branch), and RoPE's cos, sin for the joint sequence
        cat(txt_ids, img_ids) [B, S, 3]. row_scales: the LoRA adapter scales per image (None: no side branches)."""
        m = self.model
        vec = self.time_vector(timesteps, y, guidance, dtype, row_scales)
        cos, sin = ops.rope_cos_sin(m.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)))
        silu_vec = F.silu(vec)
        mods = list(self._modulation(silu_vec).split(self.mod_sizes, dim=1)) if self.modulation else []
        if row_scales is not None:
            mods = [mod if branch is None else branch.add(mod, silu_vec, row_scales, self.backend)
                    for mod, branch in zip(mods, self._mod_branches)]
        return vec, mods, cos, sin

    def _modulation(self, silu_vec: Tensor) -> Tensor:
        """Every block's modulation vector [B, rows] from one batched GEMV. Context-parallel, each rank computes 1/N
        of the rows and they are all-gathered: the 3.2 B modulation weights are read once across the ranks per step
        instead of once on every rank (benchmarks/NOTES.md, context parallelism)."""
        if self.parallel is None:
            return self.modulation(silu_vec)
        rows = self.modulation.weight.shape[0]
        start, stop = parallel.row_range(rows, self.parallel)
        return parallel.gather_rows(row_slice(self.modulation, start, stop)(silu_vec), rows, self.parallel)

    def run_blocks(self, img: Tensor, txt: Tensor, mods: list[Tensor], cos: Tensor, sin: Tensor,
                   after_block=None, lora_scales: Tensor | None = None, attend: Attend | None = None,
                   first: int = 0) -> Tensor:
        """The double then the single blocks; returns the image tokens [B, L, C]. after_block(kind, index, tokens),
        kind "double" | "single", sees each block's image tokens (for a single block a view into the joint stream)
        and may add to them in place before the next block reads them: where ControlNet residuals go in and a
        ControlNet's own block outputs come out. lora_scales, attend: as double_block_forward's. first: start at that
        double block (the step cache runs block 0 alone first: first_block)."""
        mods = iter(mods[2 * first :])
        for index, block in enumerate(self.model.double_blocks):
            if index < first:
                continue
            img, txt = double_block_forward(block, img, txt, next(mods), next(mods), cos, sin, self.backend,
                                            self.fp8_attention_rows, self.fp8_attention, lora_scales, attend)
            if after_block is not None:
                after_block("double", index, img)
        T = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for index, block in enumerate(self.model.single_blocks):
            x = single_block_forward(block, x, next(mods), cos, sin, self.backend, self.fp8_attention, lora_scales,
                                     attend)
            if after_block is not None:
                after_block("single", index, x[:, T:])
        return x[:, T:]

    def first_block(self, img: Tensor, txt: Tensor, mods: list[Tensor], cos: Tensor, sin: Tensor,
                    lora_scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Double block 0 alone: (img, txt) after it (the step cache's probe; run_blocks(first=1) goes on)."""
        return double_block_forward(self.model.double_blocks[0], img, txt, mods[0], mods[1], cos, sin, self.backend,
                                    self.fp8_attention_rows, self.fp8_attention, lora_scales)


class ControlNetResiduals:
    """A ControlNet's residuals resolved per block: after_block adds them to the image tokens in place (the sum
    diffusers' FluxTransformer2DModel computes out of place, same values)."""

    def __init__(self, double: list[Tensor] | None, single: list[Tensor] | None):
        self.samples = {"double": double, "single": single}

    def __call__(self, kind: str, index: int, tokens: Tensor) -> None:
        samples = self.samples[kind]
        if samples is not None:
            tokens += samples[index]


def _per_block(samples, count: int, name: str, repeat: bool, expected: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> list[Tensor] | None:
    """diffusers' rule for which of `samples` follows each of `count` blocks: samples[i // interval] with
    interval = ceil(count / len(samples)), or samples[i % len(samples)] with controlnet_blocks_repeat (XLabs).
    Like diffusers, samples beyond what the rule reaches are not used."""
    if samples is None:
        return None
    if not isinstance(samples, (list, tuple)) or not samples:
        raise ValueError(f"{name} must be a non-empty list of tensors (a ControlNet's output), got "
                         f"{type(samples).__name__}{' (empty)' if isinstance(samples, (list, tuple)) else ''}")
    for i, sample in enumerate(samples):
        if not isinstance(sample, Tensor) or tuple(sample.shape) != expected:
            got = tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
            raise ValueError(f"{name}[{i}] must be the image tokens' shape [B, L, hidden] = {list(expected)}, got "
                             f"{got}: the ControlNet's inputs must match the transformer's (batch, image size)")
        if sample.dtype != dtype or sample.device != device:
            raise ValueError(f"{name}[{i}] is {sample.dtype} on {sample.device}; the transformer runs {dtype} on "
                             f"{device}: run the ControlNet in the transformer's dtype and device")
    if repeat:
        return [samples[i % len(samples)] for i in range(count)]
    interval = -(-count // len(samples))  # ceil, as diffusers' int(np.ceil(count / len(samples)))
    return [samples[i // interval] for i in range(count)]


def controlnet_residuals(model: Flux, img: Tensor, block_samples, single_block_samples,
                         blocks_repeat: bool = False) -> ControlNetResiduals | None:
    """Check a ControlNet's residuals for `model` and resolve them per block (None when there are none).
    controlnet_blocks_repeat applies to the double blocks only, as in diffusers."""
    if block_samples is None and single_block_samples is None:
        return None
    if not isinstance(blocks_repeat, bool):
        raise ValueError(f"controlnet_blocks_repeat must be True or False, got {blocks_repeat!r}")
    if img.ndim != 3:
        raise ValueError(f"img must be [B, L, {model.in_channels}] packed latents, got {tuple(img.shape)}")
    expected = (*img.shape[:2], model.hidden_size)
    dtype, device = model.img_in.bias.dtype, model.img_in.bias.device
    double = _per_block(block_samples, len(model.double_blocks), "controlnet_block_samples", blocks_repeat, expected,
                        dtype, device)
    single = _per_block(single_block_samples, len(model.single_blocks), "controlnet_single_block_samples", False,
                        expected, dtype, device)
    return ControlNetResiduals(double, single)
