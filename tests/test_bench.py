"""`fluxrt bench` runs on the CPU (small config) and writes the per-step JSON in the agreed form."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "fluxrt", "bench", *args], capture_output=True, text=True, timeout=300)


def test_bench_smoke_writes_the_json(tmp_path):
    out = tmp_path / "step.json"
    result = run("--size", "64x48", "--batch", "1", "2", "--iters", "2", "--impl", "diffusers-eager", "fluxrt-bf16",
                 "fluxrt-fp8-weight", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {"gpu", "torch", "triton", "commit", "date", "per_step"} <= data.keys()
    rows = data["per_step"]
    assert {r["impl"] for r in rows} == {"diffusers-eager", "fluxrt-bf16", "fluxrt-fp8-weight"}
    assert {(r["width"], r["height"], r["batch"]) for r in rows} == {(64, 48, 1), (64, 48, 2)}
    assert all(r["model"] == "tiny" and r["ms"] > 0 and "peak_mem_gb" in r for r in rows)


def test_bench_rejects_bad_sizes():
    result = run("--size", "100x64")
    assert result.returncode == 2
    assert result.stderr.strip() == "fluxrt: error: --size '100x64' must be WIDTHxHEIGHT with multiples of 16"


def test_bench_vae_cpu_smoke(tmp_path):
    """benchmarks/bench_vae.py runs end to end without a GPU (small autoencoder; the numbers are no claim) and
    checks fluxrt's decode against the fp32 reference on the way."""
    from pathlib import Path

    out = tmp_path / "vae.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_vae.py"
    result = subprocess.run([sys.executable, str(script), "--sizes", "64", "--iters", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"diffusers-eager", "fluxrt"}
    assert all(r["ms"] > 0 and r["rel_err_vs_fp32"] < 1e-5 for r in rows)
