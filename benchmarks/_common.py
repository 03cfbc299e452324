"""Shared helpers for the kernel benchmarks in benchmarks/ (GPU only; nothing here ever times a CPU run).

Timing is triton.testing.do_bench's median (CUDA events, L2 flushed before each repetition, warmup/rep in ms).
torch.compile's first call (the compile) is timed separately and never counted in an op's time. Results go to
benchmarks/results/<name>.json and .md, with the GPU, versions, commit, date and a measured copy bandwidth.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: this benchmark needs a CUDA GPU (torch.cuda.is_available() is "
                         "False); it never times Triton's CPU interpreter.")


def gpu_slug(name: str | None = None) -> str:
    """Short GPU name for file names: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'."""
    require_cuda()
    name = (name or torch.cuda.get_device_name()).lower()
    m = re.search(r"\b([abhl]\d{2,3}[a-z]?|gb?\d{3})\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-") or "gpu"


def _git_commit() -> str:
    """HEAD (+dirty), or $FLUXRT_COMMIT where the tree has no .git (the lent GPU box gets a plain copy)."""
    if os.environ.get("FLUXRT_COMMIT"):
        return os.environ["FLUXRT_COMMIT"]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        commit = run("rev-parse", "--short", "HEAD").stdout.strip()
        return commit + ("+dirty" if run("status", "--porcelain").stdout.strip() else "")
    except Exception:
        return "unknown"


def gpu_info() -> dict:
    require_cuda()
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def bench(fn) -> float:
    """Median milliseconds of fn() (do_bench: 25 ms warm-up, 100 ms of repetitions, L2 flushed between)."""
    require_cuda()
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_copy_bandwidth(nbytes: int = 2**30) -> float:
    """GB/s of dst.copy_(src) between two nbytes device buffers, counting read + write (2 * nbytes)."""
    require_cuda()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def compile_time(fn, *args, **kwargs):
    """torch.compile(fn) and its first call on args, timed apart: returns (compiled, seconds, first output).

    Dynamo is reset first so each case compiles its own static-shape graph (inductor's on-disk cache may still
    make a repeated run's compile fast)."""
    require_cuda()
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = compiled(*args, **kwargs)
    torch.cuda.synchronize()
    return compiled, time.perf_counter() - t0, out


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare(row: dict, triton_fn, ref_fn, args: tuple, nbytes: int, copy_gbps: float, atol: float = 1e-2) -> dict:
    """One benchmark row: Triton op vs eager ref vs torch.compile(ref) on the same args, moving nbytes.

    Checked first with DESIGN.md §4's rule against the fp32 truth (ref_fn on the inputs upcast to fp32):
    max|out - truth| <= 2 * max|eager ref - truth| + atol, per output. A plain assert_close against the bf16 ref
    is no gate at real sizes: the ref's own bf16 roundings are off by several 1e-2 where LN * (1 + scale) and
    shift cancel. On a Triton failure the row carries the error and nothing is timed; a torch.compile(ref)
    failure is only flagged (compile_ok) and still timed. max_err_* are the worst errors vs the truth."""
    require_cuda()
    from fluxrt.testing import assert_within_rule, max_abs_error

    row = {**row, "MB": nbytes / 1e6}
    truth = _as_tuple(ref_fn(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)))
    eager = _as_tuple(ref_fn(*args))
    err = lambda outs: max(max_abs_error(o, t) for o, t in zip(outs, truth))  # noqa: E731

    def check(outs, what):
        for i, (o, b, t) in enumerate(zip(_as_tuple(outs), eager, truth)):
            assert_within_rule(o, b, t, atol=atol, what=f"{what} output {i}")
        return err(_as_tuple(outs))

    errs = {"max_err_triton": None, "max_err_eager": err(eager), "max_err_compile": None}
    try:
        errs["max_err_triton"] = check(triton_fn(*args), "triton")
    except AssertionError as e:
        print(f"MISMATCH, not timed: {row}\n{e}", file=sys.stderr)
        return {**row, "error": str(e), **errs}
    compiled, compile_s, compiled_out = compile_time(ref_fn, *args)
    try:
        errs["max_err_compile"], compile_ok = check(compiled_out, "torch.compile(ref)"), True
    except AssertionError as e:
        print(f"warning: {e} ({row})", file=sys.stderr)
        errs["max_err_compile"], compile_ok = err(_as_tuple(compiled_out)), False
    del truth, eager, compiled_out
    t_triton, t_eager, t_compile = (bench(lambda f=f: f(*args)) for f in (triton_fn, ref_fn, compiled))
    return {
        **row,
        "triton_ms": t_triton, "eager_ms": t_eager, "compile_ms": t_compile,
        "triton_GB/s": gbps(nbytes, t_triton), "eager_GB/s": gbps(nbytes, t_eager),
        "compile_GB/s": gbps(nbytes, t_compile),
        "triton_frac_copy_bw": gbps(nbytes, t_triton) / copy_gbps,
        "speedup_vs_eager": t_eager / t_triton, "speedup_vs_compile": t_compile / t_triton,
        "compile_s": compile_s, "compile_ok": compile_ok, **errs,
    }


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], meta: dict) -> None:
    """benchmarks/results/<name>.json ({"meta", "rows"}) and <name>.md (meta, then the rows as a table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    labels = {"gpu": "GPU", "torch": "torch", "cuda": "CUDA", "triton": "triton", "commit": "commit",
              "date": "date (UTC)", "copy_gbps": "measured copy bandwidth (GB/s, read + write)",
              "matmul_bf16_tflops": "measured bf16 matmul rate (TFLOP/s, 8192³)"}
    head = [f"# {name}", ""] + [f"- {labels.get(k, k)}: {_fmt(v)}" for k, v in meta.items()]
    table = markdown_table(rows)
    (RESULTS / f"{name}.md").write_text("\n".join(head) + "\n\n" + table + "\n")
    print("\n".join(head) + "\n\n" + table)
    print(f"\nwrote {RESULTS / name}.json and .md")


def finish(name: str, rows: list[dict], meta: dict) -> None:
    """Write the results (benchmarks/results/<name>_<gpu>.*) and fail the run if any row failed its check."""
    write_results(f"{name}_{gpu_slug()}", rows, meta)
    if any("error" in r for r in rows):
        raise SystemExit("some fluxrt results did not match their reference (see the error column)")
