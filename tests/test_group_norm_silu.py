"""fluxrt.ops.group_norm_silu / add_group_norm_silu and the extension behind them (fluxrt._C, csrc/) vs their
references: CPU kernels here, CUDA kernels in the gpu-marked tests."""

import logging
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt import _extension
from fluxrt.ops.group_norm_silu import add_group_norm_silu_ref, group_norm_silu_ref

needs_ext = pytest.mark.skipif(not _extension.available(), reason="fluxrt._C is not built (test_extension_is_built "
                               "fails for that unless FLUXRT_SKIP_EXT=1)")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Kernel and reference both compute in fp32 and round once, so a low-precision output may sit 1 ulp from the
# reference where the two fp32 values straddle a rounding boundary: rtol = 1 ulp relative (2^-7 bf16, 2^-10 fp16;
# the worst case, at the bottom of a binade). fp32: the two fp32 formulas differ by a few ulps of O(1) values.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2**-7), torch.float16: (1e-5, 2**-10)}


def make(shape, dtype, layout, seed, device="cpu", offset=0.0):
    """x, y [N, C, H, W] in `layout`; weight ~ 1 + N(0, 0.2) and bias ~ N(0, 1) in fp32 (fresh values, never 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (offset + torch.randn(shape, generator=gen) for _ in range(2))
    weight, bias = 1 + 0.2 * torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    x, y = (t.to(device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout]) for t in (x, y))
    return x, y, weight.to(device), bias.to(device)


def assert_close(out, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def check_op(op, shape, groups, dtype, layout, seed, device="cpu", silu=True, weight_dtype=torch.float32):
    """Run the op through fluxrt.ops with backend="ext" and compare every output element with the reference."""
    x, y, w, b = make(shape, dtype, layout, seed, device)
    w, b = w.to(weight_dtype), b.to(weight_dtype)
    fmt = LAYOUTS[layout]
    with ops.trace() as ran:
        if op == "group_norm_silu":
            out = ops.group_norm_silu(x, w, b, groups, 1e-6, silu, backend="ext")
        else:
            s, out = ops.add_group_norm_silu(x, y, w, b, groups, 1e-6, silu, backend="ext")
    assert ran == [(op, "ext")]
    if op == "group_norm_silu":
        expected = group_norm_silu_ref(x, w, b, groups, 1e-6, silu)
    else:
        s_ref, expected = add_group_norm_silu_ref(x, y, w, b, groups, 1e-6, silu)
        assert torch.equal(s, s_ref)  # the same single rounding of x + y as torch's add
        assert s.is_contiguous(memory_format=fmt)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert_close(out, expected, dtype)


def test_extension_is_built():
    """CI must build fluxrt._C: without it everything silently runs the torch formulas (the issue asks for a
    failure, not a skip). FLUXRT_SKIP_EXT=1 declares a deliberate build without it."""
    if os.environ.get("FLUXRT_SKIP_EXT") == "1":
        pytest.skip("FLUXRT_SKIP_EXT=1: built without fluxrt._C on purpose")
    assert _extension.available(), _extension.missing_reason()
    assert _extension.has_kernels("cpu")
    assert _extension.has_kernels("cuda") == torch._C._dispatch_has_kernel_for_dispatch_key(
        "fluxrt_C::add_group_norm_silu", "CUDA")


SHAPES = [  # (N, C, H, W), groups
    ((1, 8, 7, 5), 4),  # odd H x W, C/G = 2
    ((3, 16, 7, 5), 16),  # N = 3, C/G = 1
    ((1, 64, 1, 1), 8),  # 1 x 1 pixels, C/G = 8
    ((2, 20, 13, 3), 5),  # C = 20: channel runs not a multiple of the vector width
    ((2, 16, 95, 97), 4),  # groups of 36860 elements: several statistics chunks / pixel tiles, ragged last one
]


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, groups", SHAPES, ids=str)
@pytest.mark.parametrize("op", ["group_norm_silu", "add_group_norm_silu"])
def test_matches_reference(op, shape, groups, dtype, layout):
    seed = zlib.crc32(f"{op} {shape} {dtype} {layout}".encode())
    # Both switches both ways: SiLU on with fp32 weights, off with weights in x's dtype.
    check_op(op, shape, groups, dtype, layout, seed, silu=True, weight_dtype=torch.float32)
    check_op(op, shape, groups, dtype, layout, seed + 1, silu=False, weight_dtype=dtype)


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["group_norm_silu", "add_group_norm_silu"])
def test_large_mean_statistics_are_stable(op, layout):
    """Inputs ~ 1000 + N(0, 2) in fp32 (groups of 32K elements). E[x^2] - E[x]^2 in fp32 is off by ~0.4 here, and
    torch's own CPU channels_last GroupNorm by ~1.4 (seen with torch 2.13), so the bound is absolute, against the
    fp64 truth: two ulps of 1000 (the inputs' own resolution) through rstd ~ 1 and the weight."""
    x, y, w, b = make((1, 32, 64, 64), torch.float32, layout, seed=7, offset=500.0)
    if op == "group_norm_silu":
        x = x + y  # ~1000 + N(0, 2): the same magnitude as the residual sum below
        out, truth = ops.group_norm_silu(x, w, b, 4, backend="ext"), group_norm_silu_ref(
            x.double(), w.double(), b.double(), 4)
    else:
        s, out = ops.add_group_norm_silu(x, y, w, b, 4, backend="ext")
        truth = group_norm_silu_ref(s.double(), w.double(), b.double(), 4)
    bound = 2 * torch.finfo(torch.float32).eps * 1000 * w.abs().max().item()
    err = (out.double() - truth).abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


@needs_ext
def test_backends_agree():
    x, y, w, b = make((2, 32, 9, 11), torch.bfloat16, "channels_last", seed=11)
    with ops.trace() as ran:
        s_torch, out_torch = ops.add_group_norm_silu(x, y, w, b, 8, backend="torch")
        s_ext, out_ext = ops.add_group_norm_silu(x, y, w, b, 8, backend="ext")
    assert ran == [("add_group_norm_silu", "torch"), ("add_group_norm_silu", "ext")]
    assert torch.equal(s_torch, s_ext)
    assert out_torch.is_contiguous(memory_format=torch.channels_last)
    assert out_ext.is_contiguous(memory_format=torch.channels_last)
    assert_close(out_ext, out_torch, torch.bfloat16)
    # "auto" is the extension when it is built: the same (deterministic) bits.
    with ops.trace() as ran:
        auto = ops.group_norm_silu(x, w, b, 8)
    assert ran == [("group_norm_silu", "ext")]
    assert torch.equal(auto, ops.group_norm_silu(x, w, b, 8, backend="ext"))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'ext', 'torch'\), got 'cuda'"):
        ops.group_norm_silu(x, w, b, 8, backend="cuda")


def test_missing_extension_falls_back_announced_once(monkeypatch, caplog):
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", "No module named 'fluxrt._C' (simulated)")
    monkeypatch.setattr(_extension, "_announced", set())
    monkeypatch.setenv("FLUXRT_SKIP_EXT", "1")
    x, y, w, b = make((1, 8, 5, 3), torch.float32, "nchw", seed=3)
    with caplog.at_level(logging.WARNING, logger="fluxrt"), ops.trace() as ran:
        for _ in range(2):
            out = ops.group_norm_silu(x, w, b, 2)
            ops.add_group_norm_silu(x, y, w, b, 2)
    assert torch.equal(out, group_norm_silu_ref(x, w, b, 2))
    assert ran.backends() == {"group_norm_silu": {"torch"}, "add_group_norm_silu": {"torch"}}
    warnings = [r.getMessage() for r in caplog.records if "torch formulas" in r.getMessage()]
    assert len(warnings) == 1 and "pip install --no-build-isolation -e ." in warnings[0]
    assert "FLUXRT_SKIP_EXT=1 is set" in warnings[0]
    with pytest.raises(RuntimeError, match=r"fluxrt\._C .* is not importable .*build_ext --inplace"):
        ops.group_norm_silu(x, w, b, 2, backend="ext")


@needs_ext
def test_device_without_kernels_falls_back_or_raises(monkeypatch, caplog):
    """A build without kernels for the tensor's device (CUDA tensors, CPU-only build; simulated here for CPU):
    "auto" runs the torch formula and says why, "ext" refuses."""
    monkeypatch.setattr(_extension, "_announced", set())
    monkeypatch.setattr(_extension, "has_kernels", lambda device_type: False)
    x, _, w, b = make((1, 8, 5, 3), torch.float32, "nchw", seed=4)
    with caplog.at_level(logging.WARNING, logger="fluxrt"), ops.trace() as ran:
        assert torch.equal(ops.group_norm_silu(x, w, b, 2), group_norm_silu_ref(x, w, b, 2))
    assert ran == [("group_norm_silu", "torch")]
    assert any("fluxrt._C has no cpu kernels" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="backend='ext': fluxrt._C has no cpu kernels"):
        ops.group_norm_silu(x, w, b, 2, backend="ext")


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    x, y, w, b = make((2, 8, 5, 3), torch.float32, layout, seed=5)
    for backend in ("ext", "torch"):
        with ops.trace() as ran:
            opcheck(torch.ops.fluxrt.group_norm_silu.default, (x, w, b, 4), {"backend": backend})
            opcheck(torch.ops.fluxrt.add_group_norm_silu.default, (x, y, w, b, 4, 1e-5, False), {"backend": backend})
        assert ran.backends() == {"group_norm_silu": {backend}, "add_group_norm_silu": {backend}}
    opcheck(torch.ops.fluxrt_C.group_norm_silu.default, (x, w.to(x.dtype), b, 4, 1e-6, True))
    opcheck(torch.ops.fluxrt_C.add_group_norm_silu.default, (x, y, w, b, 4, 1e-6, True))


@needs_ext
def test_compiles_without_graph_breaks():
    x, y, w, b = make((1, 16, 6, 6), torch.float32, "channels_last", seed=6)

    def block(x, y):  # residual add fused with the next norm, then another norm, as in the decoder
        s, h = ops.add_group_norm_silu(x, y, w, b, 4, backend="ext")
        return s, ops.group_norm_silu(h, w, b, 4, silu=False, backend="ext")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with ops.trace() as ran:
        outs = compiled(x, y)
    assert ran == [("add_group_norm_silu", "ext"), ("group_norm_silu", "ext")]
    for got, want in zip(outs, block(x, y)):
        assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)


@needs_ext
def test_the_extension_loads_on_first_use_with_its_fakes():
    """`import fluxrt` leaves fluxrt._C unloaded (csrc/ and its shared libraries load when a decoder norm first
    runs); then the first op call loads it and registers the fakes of its own ops, so opcheck and torch.compile
    work on torch.ops.fluxrt_C.* too."""
    code = textwrap.dedent("""
        import sys
        import torch
        from torch.library import opcheck
        import fluxrt, fluxrt.ops as ops
        assert "fluxrt._C" not in sys.modules, "import fluxrt loaded fluxrt._C"
        x, w, b = torch.randn(1, 8, 5, 3), 1 + torch.rand(8), torch.randn(8)
        with ops.trace() as ran:
            ops.group_norm_silu(x, w, b, 4)
        assert "fluxrt._C" in sys.modules and ran == [("group_norm_silu", "ext")], ran
        opcheck(torch.ops.fluxrt_C.group_norm_silu.default, (x, w, b, 4, 1e-6, True))
        opcheck(torch.ops.fluxrt_C.add_group_norm_silu.default, (x, x, w, b, 4, 1e-6, True))
        print("loaded on first use")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded on first use"


@needs_ext
def test_empty_inputs_give_empty_outputs():
    for shape in ((0, 8, 4, 4), (2, 8, 0, 3)):
        x, y, w, b = make(shape, torch.bfloat16, "nchw", seed=8)
        assert torch.ops.fluxrt_C.group_norm_silu(x, w, b, 4, 1e-6, True).shape == shape
        s, out = torch.ops.fluxrt_C.add_group_norm_silu(x, y, w, b, 4, 1e-6, True)
        assert s.shape == out.shape == shape


@needs_ext
def test_bad_inputs_are_rejected_with_a_remedy():
    x, y, w, b = make((2, 8, 5, 3), torch.bfloat16, "nchw", seed=9)
    gn, add = torch.ops.fluxrt_C.group_norm_silu, torch.ops.fluxrt_C.add_group_norm_silu
    cases = [
        (lambda: gn(x[0], w, b, 4, 1e-6, True), r"x must be 4-D \[N, C, H, W\], got shape \[8, 5, 3\]"),
        (lambda: gn(x.double(), w, b, 4, 1e-6, True), "x must be float32, bfloat16 or float16, got Double"),
        (lambda: gn(x, w, b, 3, 1e-6, True), "num_groups must divide the channel count C = 8, got num_groups = 3"),
        (lambda: gn(x, w, b, 0, 1e-6, True), "num_groups must divide the channel count C = 8, got num_groups = 0"),
        (lambda: gn(x, w[:4], b, 4, 1e-6, True), r"weight must have shape \[C\] = \[8\], got \[4\]"),
        (lambda: gn(x, w, b[None], 4, 1e-6, True), r"bias must have shape \[C\] = \[8\], got \[1, 8\]"),
        (lambda: gn(x, w.half(), b, 4, 1e-6, True), r"weight must be float32 or x's dtype \(BFloat16\), got Half"),
        (lambda: gn(x.transpose(2, 3), w, b, 4, 1e-6, True),
         r"contiguous NCHW or channels_last.*call \.contiguous\(\) or \.contiguous\(memory_format=torch\.channels_last\)"),
        (lambda: add(x, y[:1], w, b, 4, 1e-6, True), r"y must have x's shape \[2, 8, 5, 3\], got \[1, 8, 5, 3\]"),
        (lambda: add(x, y.half(), w, b, 4, 1e-6, True), "y must have x's dtype BFloat16, got Half; cast one of them"),
        (lambda: add(x, y.contiguous(memory_format=torch.channels_last), w, b, 4, 1e-6, True),
         r"y must have x's memory format \(contiguous NCHW\)"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# ---- CUDA kernels (skipped without a GPU; tests/conftest.py) ----


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["group_norm_silu", "add_group_norm_silu"])
def test_cuda_matches_cpu_and_reference_at_decoder_size(op, layout):
    """The 1024^2 decoder's largest norm, [1, 128, 1024, 1024] bf16 in 32 groups of 4M elements, and a 512-channel
    one: CUDA vs the reference (on the GPU) and vs the CPU kernels."""
    for shape, groups in (((1, 128, 1024, 1024), 32), ((2, 512, 128, 128), 32)):
        x, y, w, b = make(shape, torch.bfloat16, layout, seed=shape[1], device="cuda")
        args = (w, b, groups, 1e-6, True)
        if op == "group_norm_silu":
            out, expected = ops.group_norm_silu(x, *args, backend="ext"), group_norm_silu_ref(x, *args)
            on_cpu = torch.ops.fluxrt_C.group_norm_silu(x.cpu(), w.cpu(), b.cpu(), groups, 1e-6, True)
        else:
            s, out = ops.add_group_norm_silu(x, y, *args, backend="ext")
            s_ref, expected = add_group_norm_silu_ref(x, y, *args)
            assert torch.equal(s, s_ref)
            on_cpu = torch.ops.fluxrt_C.add_group_norm_silu(x.cpu(), y.cpu(), w.cpu(), b.cpu(), groups, 1e-6, True)[1]
        assert out.is_cuda and out.is_contiguous(memory_format=LAYOUTS[layout])
        assert_close(out, expected, torch.bfloat16)
        assert_close(out.cpu(), on_cpu, torch.bfloat16)
        del x, y, out, expected, on_cpu
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, groups", SHAPES, ids=str)
@pytest.mark.parametrize("op", ["group_norm_silu", "add_group_norm_silu"])
def test_cuda_odd_shapes(op, shape, groups, dtype, layout):
    check_op(op, shape, groups, dtype, layout, seed=13, device="cuda")
    check_op(op, shape, groups, dtype, layout, seed=14, device="cuda", silu=False, weight_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_unaligned_and_large_mean(layout):
    """Storage offset 1 (not 16-byte aligned: the scalar path) and 1000 + N(0, 1) fp32 groups of 512K elements
    (many partial-statistics blocks merged)."""
    x, _, w, b = make((1, 64, 128, 128), torch.float32, layout, seed=15, device="cuda", offset=1000.0)
    out = ops.group_norm_silu(x, w, b, 2, backend="ext")
    truth = group_norm_silu_ref(x.double(), w.double(), b.double(), 2)
    bound = 2 * torch.finfo(torch.float32).eps * 1000 * w.abs().max().item()
    assert (out.double() - truth).abs().max().item() <= bound
    buf = torch.empty(x.numel() + 1, device="cuda", dtype=torch.bfloat16)
    unaligned = buf[1:].view(x.permute(0, 2, 3, 1).shape if layout == "channels_last" else x.shape)
    unaligned = unaligned.permute(0, 3, 1, 2) if layout == "channels_last" else unaligned
    unaligned.copy_(x - 1000)
    assert unaligned.data_ptr() % 16 != 0 and unaligned.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(ops.group_norm_silu(unaligned, w, b, 2, backend="ext"), group_norm_silu_ref(unaligned, w, b, 2),
                 torch.bfloat16)


@pytest.mark.gpu
def test_cuda_device_mismatch_is_rejected():
    x, y, w, b = make((1, 8, 4, 4), torch.bfloat16, "nchw", seed=16, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight is on cpu but x is on cuda:0; move them to the same device"):
        torch.ops.fluxrt_C.group_norm_silu(x, w.cpu(), b, 4, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"y is on cpu but x is on cuda:0"):
        torch.ops.fluxrt_C.add_group_norm_silu(x, y.cpu(), w, b, 4, 1e-6, True)
