"""fluxrt.ops backend selection: explicit, never a silent fallback."""

import os
import subprocess
import sys
import textwrap


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
