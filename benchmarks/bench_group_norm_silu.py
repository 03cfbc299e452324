"""Benchmark fluxrt._C's group_norm_silu / add_group_norm_silu (csrc/) at the FLUX VAE decoder's norm shapes.

Shapes: every GroupNorm input of the decoder for 1024^2 and 2048^2 images (32 groups), bf16, NCHW and
channels_last, random data. For each: the CUDA kernel vs torch eager (what diffusers runs: bf16 F.group_norm then
F.silu, after x + y for the fused-add op) vs torch.compile of that eager function, as do_bench medians (L2 flushed
between repetitions; compile time reported apart). GB/s counts the bytes the op must move at minimum — each
[N, C, H, W] tensor read or written once (group_norm_silu: x in, out; add_group_norm_silu: x, y in, s, out) — so a
kernel that reads x twice (statistics, then normalise) tops out near 2/3 of copy bandwidth on the first op and
4/5 on the second; the extension's fraction of the measured device-to-device copy bandwidth is given too. Before
timing, the kernel must pass DESIGN.md §4's rule against the fp32 truth (group_norm_silu_ref on fp32 inputs):
max error <= 2 x eager's + 1e-2, and the fused add's s must equal torch's x + y exactly.

    python benchmarks/bench_group_norm_silu.py [--images 1024 2048] [--layouts nchw channels_last] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GROUPS, EPS = 32, 1e-6
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def decoder_norm_shapes(image: int) -> list[tuple[int, int, int, int]]:
    """[1, C, H, W] of the decoder's GroupNorms: 512 channels at 1/8 and 1/4 of the image, 256 at 1/2, 128 at 1/1."""
    return [(1, 512, image // 8, image // 8), (1, 512, image // 4, image // 4), (1, 256, image // 2, image // 2),
            (1, 128, image, image)]


def eager_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def eager_add_group_norm_silu(x, y, weight, bias):
    s = x + y
    return s, F.silu(F.group_norm(s, GROUPS, weight, bias, EPS))


def ext_group_norm_silu(x, weight, bias):
    return torch.ops.fluxrt_C.group_norm_silu(x, weight, bias, GROUPS, EPS, True)


def ext_add_group_norm_silu(x, y, weight, bias):
    return torch.ops.fluxrt_C.add_group_norm_silu(x, y, weight, bias, GROUPS, EPS, True)


def run_case(row: dict, ext_fn, eager_fn, ref_fn, args: tuple, nbytes: int, copy_gbps: float, compile_: bool) -> dict:
    """Check the extension against the fp32 truth, then time it, eager and (optionally) torch.compile(eager)."""
    from fluxrt.testing import assert_within_rule, max_abs_error

    row = {**row, "MB": nbytes / 1e6}
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    truth = as_tuple(ref_fn(*(a.float() for a in args)))[-1]
    ext_out, eager_out = as_tuple(ext_fn(*args)), as_tuple(eager_fn(*args))
    errs = {"max_err_ext": max_abs_error(ext_out[-1], truth), "max_err_eager": max_abs_error(eager_out[-1], truth)}
    try:
        assert_within_rule(ext_out[-1], eager_out[-1], truth, atol=1e-2, what="fluxrt._C output")
        if len(ext_out) == 2 and not torch.equal(ext_out[0], eager_out[0]):
            raise AssertionError("fluxrt._C's s differs from torch's x + y")
    except AssertionError as e:
        print(f"MISMATCH, not timed: {row}\n{e}", file=sys.stderr)
        return {**row, "error": str(e), **errs}
    del truth, ext_out, eager_out
    times = {"ext_ms": _common.bench(lambda: ext_fn(*args)), "eager_ms": _common.bench(lambda: eager_fn(*args))}
    if compile_:
        compiled, compile_s, _ = _common.compile_time(eager_fn, *args)
        times["compile_ms"] = _common.bench(lambda: compiled(*args))
        row["compile_s"] = compile_s
    rates = {k.replace("_ms", "_GB/s"): _common.gbps(nbytes, ms) for k, ms in times.items()}
    return {**row, **times, **rates, "ext_frac_copy_bw": rates["ext_GB/s"] / copy_gbps,
            "speedup_vs_eager": times["eager_ms"] / times["ext_ms"],
            **({"speedup_vs_compile": times["compile_ms"] / times["ext_ms"]} if compile_ else {}), **errs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1024, 2048], help="image sizes (pixels per side)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (each case compiles anew)")
    args = parser.parse_args()
    _common.require_cuda()
    from fluxrt import _extension
    from fluxrt.ops.group_norm_silu import add_group_norm_silu_ref, group_norm_silu_ref

    _extension.require()
    if not _extension.has_kernels("cuda"):
        raise SystemExit("fluxrt._C was built without CUDA kernels: rebuild it with a CUDA torch and nvcc present "
                         "(`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`)")
    meta = {**_common.gpu_info(), "copy_gbps": _common.measure_copy_bandwidth()}
    shapes = list(dict.fromkeys(s for image in args.images for s in decoder_norm_shapes(image)))
    dtype, rows = torch.bfloat16, []
    for shape in shapes:
        for layout in args.layouts:
            torch.manual_seed(0)
            x, y = (torch.randn(shape, dtype=dtype, device="cuda").contiguous(memory_format=LAYOUTS[layout])
                    for _ in range(2))
            weight = (1 + 0.2 * torch.randn(shape[1], device="cuda")).to(dtype)
            bias = torch.randn(shape[1], device="cuda").to(dtype)
            big = x.numel() * x.element_size()
            cases = [  # op, extension, eager, reference, args, bytes moved
                ("group_norm_silu", ext_group_norm_silu, eager_group_norm_silu,
                 lambda x, w, b: group_norm_silu_ref(x, w, b, GROUPS, EPS), (x, weight, bias), 2 * big),
                ("add_group_norm_silu", ext_add_group_norm_silu, eager_add_group_norm_silu,
                 lambda x, y, w, b: add_group_norm_silu_ref(x, y, w, b, GROUPS, EPS), (x, y, weight, bias), 4 * big),
            ]
            for op, ext_fn, eager_fn, ref_fn, fargs, nbytes in cases:
                row = {"op": op, "shape": "x".join(map(str, shape)), "layout": layout, "dtype": "bf16"}
                rows.append(run_case(row, ext_fn, eager_fn, ref_fn, fargs, nbytes, meta["copy_gbps"],
                                     not args.no_compile))
                print(rows[-1], flush=True)
            del x, y
            torch.cuda.empty_cache()
    _common.finish("group_norm_silu", rows, meta)


if __name__ == "__main__":
    main()
