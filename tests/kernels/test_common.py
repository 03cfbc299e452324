"""kernels/_common.py: the shared output check (through the launchers that use it), and the shared @triton.jit
helpers compiled by Triton's real compiler for a Hopper GPU, which the interpreter-only CPU CI would otherwise
never do (no GPU is needed to compile)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxrt.kernels import _common as C
from fluxrt.kernels import joint_attention, modulated_norm, rope_qk_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_output_allocates_or_checks_the_callers_tensor():
    fresh = C.output(None, (2, 3, 8), torch.float16, torch.device(DEVICE))
    assert fresh.shape == (2, 3, 8) and fresh.dtype == torch.float16 and fresh.device.type == DEVICE
    wide = torch.empty(2, 3, 20, device=DEVICE)
    assert C.output(wide[..., 4:12], (2, 3, 8), torch.float32, wide.device).data_ptr() == wide[..., 4:].data_ptr()
    bad = {
        "shape": torch.empty(2, 3, 9, device=DEVICE),
        "dtype": torch.empty(2, 3, 8, dtype=torch.float64, device=DEVICE),
        "device": torch.empty(2, 3, 8, device="meta"),
        "strided last dim": torch.empty(2, 3, 16, device=DEVICE)[..., ::2],
        "overlapping rows": torch.empty(64, device=DEVICE).as_strided((2, 3, 8), (24, 4, 1)),
    }
    for what, out in bad.items():
        with pytest.raises(ValueError, match=r"out must be \(2, 3, 8\) torch.float32 on .* rows that do not overlap"):
            C.output(out, (2, 3, 8), torch.float32, torch.device(DEVICE))
            pytest.fail(f"accepted an out with the wrong {what}")


def test_launchers_refuse_an_out_they_cannot_write_and_leave_it_untouched():
    """Each launcher that takes `out=` checks it before launching: a tensor on another device (joint attention did
    not check the device) and rows that overlap (the norm and RoPE kernels did not check the row stride)."""
    q, k, v = (randn(1, 2, 9, 64, seed=s) for s in range(3))
    with pytest.raises(ValueError, match=r"out must be \(1, 9, 128\) torch.float32 on"):
        joint_attention.joint_attention(q, k, v, out=torch.empty(1, 9, 128, device="meta"))

    x, scale, shift = randn(2, 5, 64, seed=3), randn(2, 64, seed=4), randn(2, 64, seed=5)
    poisoned = torch.full((2 * 5 * 32 + 32,), float("nan"), device=DEVICE)
    overlapping = poisoned.as_strided((2, 5, 64), (5 * 32, 32, 1))  # each row shares half of the next one
    with pytest.raises(ValueError, match="rows that do not overlap"):
        modulated_norm.modulated_layer_norm(x, scale, shift, out=overlapping)
    assert torch.isnan(poisoned).all()  # refused before anything was written

    qkv = randn(1, 4, 3 * 2 * 16, seed=6)
    cos, sin = randn(1, 4, 8, seed=7), randn(1, 4, 8, seed=8)
    qs = randn(16, seed=9)
    with pytest.raises(ValueError, match=r"out must be \(3, 1, 2, 4, 16\) torch.float32"):
        rope_qk_norm.rope_qk_norm(qkv, qs, qs, cos, sin, 2, out=torch.empty(3, 1, 2, 4, 16, device=DEVICE,
                                                                           dtype=torch.float16))


# Compiled for sm_90 in a subprocess without TRITON_INTERPRET (triton decides interpreter or compiler when a kernel
# is defined): each kernel that calls a _common helper, with the constexpr switches that reach the helper.
COMPILE_FOR_HOPPER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fluxrt.kernels import fp8_gemm, joint_attention, modulated_norm, quantize_rows


def compile_for_hopper(fn, pointers, constexprs, scalars=()):
    # pointers: name -> element type; scalars: the fp32 scalar arguments; every other argument an i32
    signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
                 else "fp32" if name in scalars else "i32" for name in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    print("compiled", fn.__name__)


bf16 = dict.fromkeys(("BIAS", "RES", "GATE", "OUT"), "bf16")
compile_for_hopper(fp8_gemm._fp8_gemm_kernel, {**bf16, "X": "fp8e4nv", "W": "fp8e4nv", "SCALE": "fp32",
                                                "XSCALE": "fp32"},
                   dict(HAS_XSCALE=True, HAS_BIAS=True, EPILOGUE=1, DECODE_BITS=False, DOT_PRECISION="tf32",
                        BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8))
compile_for_hopper(fp8_gemm._splitk_epilogue_kernel, {**bf16, "PART": "fp32", "SCALE": "fp32"},
                   dict(HAS_BIAS=True, EPILOGUE=1, BLOCK_M=16, BLOCK_N=64))
compile_for_hopper(quantize_rows._quantize_rows_kernel, {"X": "bf16", "X8": "fp8e4nv", "SCALE": "fp32"},
                   dict(HAS_GELU=True, BLOCK_K=1024))
compile_for_hopper(modulated_norm._modulated_norm_kernel,
                   {**dict.fromkeys(("X", "GATE", "Y", "SCALE", "SHIFT", "H_OUT"), "bf16"), "OUT": "fp8e4nv",
                    "ROW_SCALE": "fp32"},
                   dict(HAS_RESIDUAL=True, HAS_NORM=True, QUANT_OUT=True, BLOCK_D=1024), scalars=("eps",))
scales = dict.fromkeys(("Q_SCALE", "K_SCALE", "V_SCALE", "V_ABSMAX", "ROW_SCALE"), "fp32")
for qkv, out, flags in [("fp8e4nv", "bf16", dict(IS_FP8=True, V_ABSMAX_SLOTS=0)),  # fp8 attention
                        ("bf16", "fp8e4nv", dict(IS_FP8=False, V_ABSMAX_SLOTS=32))]:  # e4m3 output rows
    compile_for_hopper(joint_attention._joint_attention_kernel, {**dict.fromkeys("QKV", qkv), "OUT": out, **scales},
                       dict(HEAD_DIM=64, BLOCK_M=64, BLOCK_N=32, DOT_PRECISION="tf32", USE_TMA=False,
                            WARP_SPECIALIZE=False, **flags), scalars=("qk_scale",))
"""


def test_kernels_using_the_shared_helpers_compile_for_a_gpu(tmp_path):
    """The interpreter runs a kernel that reads any Python global; Triton's compiler accepts only tl.constexpr
    globals (a plain 448.0 in a kernel passes every CPU test and fails at the first GPU launch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile now, not a cached result
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                            timeout=600, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split().count("compiled") == 6, result.stdout
