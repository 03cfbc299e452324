"""fluxrt.ops backend selection: explicit, never a silent fallback, and observable (ops.trace)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import fluxrt.ops as ops


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, fluxrt.ops as ops
        x, s = torch.randn(1, 3, 64), torch.randn(1, 64)
        assert ops.modulated_layer_norm(x, s, s, backend="torch").shape == x.shape  # the torch formula still works
        try:
            ops.modulated_layer_norm(x, s, s, backend="triton")
        except RuntimeError as err:
            print(err)
        else:
            raise SystemExit("no error")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "set TRITON_INTERPRET=1 in the environment" in result.stdout


def test_import_fluxrt_does_not_import_the_kernels():
    # kernel modules (and with them triton, and TRITON_INTERPRET's effect) load on an op's first use only
    code = "import sys, fluxrt, fluxrt.ops; print(any(m.startswith('fluxrt.kernels.') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---- ops.trace(): what ran, per thread, nested ----


def norm_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen) for shape in ((2, 5, 64), (2, 64), (2, 64)))  # x, scale, shift


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the kernel in Triton's interpreter
def test_an_op_records_the_backend_it_ran_on(backend):
    x, scale, shift = norm_inputs()
    with ops.trace() as ran:
        out = ops.modulated_layer_norm(x, scale, shift, backend=backend)
        ops.gated_residual(x, scale, out, backend=backend)
    assert ran == [("modulated_layer_norm", backend), ("gated_residual", backend)]
    assert ran.backends() == {"modulated_layer_norm": {backend}, "gated_residual": {backend}}
    assert ran.ran_on(backend) == {"modulated_layer_norm", "gated_residual"} and ran.ran_on("ext") == set()


def test_auto_records_the_formula_it_chose():
    x, scale, shift = norm_inputs(1)
    with ops.trace() as ran:
        ops.modulated_layer_norm(x, scale, shift)  # auto on a CPU tensor: the torch formula
    assert ran == [("modulated_layer_norm", "torch")]


def test_a_call_that_raises_records_nothing():
    x, scale, shift = norm_inputs(2)
    with ops.trace() as ran:
        with pytest.raises(ValueError, match="modulation vectors must be"):
            ops.modulated_layer_norm(x, scale[:, :3], shift, backend="triton")
    assert ran == []


def test_traces_nest():
    x, scale, shift = norm_inputs(3)
    with ops.trace() as outer:
        with ops.trace() as inner:  # equal to `outer` (both empty) when it opens and closes: left by identity
            pass
        ops.modulated_layer_norm(x, scale, shift, backend="torch")
        with ops.trace() as second:
            ops.gated_residual(x, scale, x, backend="torch")
    ops.gated_residual(x, scale, x, backend="torch")  # outside every trace: recorded nowhere
    assert inner == []
    assert second == [("gated_residual", "torch")]
    assert outer == [("modulated_layer_norm", "torch"), ("gated_residual", "torch")]


def test_a_trace_sees_only_its_own_thread():
    x, scale, shift = norm_inputs(4)
    other_thread = []

    def run_elsewhere():
        with ops.trace() as ran:
            ops.gated_residual(x, scale, x, backend="torch")
        other_thread.extend(ran)

    with ops.trace() as ran:
        worker = threading.Thread(target=run_elsewhere)
        worker.start()
        worker.join()
        ops.modulated_layer_norm(x, scale, shift, backend="torch")
    assert ran == [("modulated_layer_norm", "torch")]
    assert other_thread == [("gated_residual", "torch")]
