"""The main job (`python -m fluxrt demo`): runs, prints per-step latency; bad arguments give one clear line."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "fluxrt", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_and_reports_latency():
    result = run("demo", "--steps", "2", "--width", "64", "--height", "48", "--txt-len", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "12 image + 5 text tokens, 2 steps" in result.stdout
    assert "step 2/2" in result.stdout and "median per-step latency" in result.stdout


def test_demo_rejects_bad_size_with_one_line():
    result = run("demo", "--width", "100", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == "fluxrt: error: --width must be a positive multiple of 16, got 100"
