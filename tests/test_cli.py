"""`python -m fluxrt generate` with the built-in tiny-random model: writes the PNG, prints the latency table, same
seed -> same bytes, and the per-step times it prints are the steps' (bad input: tests/test_cli_errors.py)."""

import statistics
import subprocess
import sys
import time

import torch
from PIL import Image

from fluxrt import cli, sampling
from fluxrt.tiny import tiny_random_pipeline

SMALL = ("--width", "64", "--height", "48", "--steps", "2", "--no-progress")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fluxrt", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_generate_writes_the_png_and_compares_with_the_reference(tmp_path):
    out = tmp_path / "new" / "a.png"  # missing folders are created
    result = run("generate", *SMALL, "--prompt", "a red apple", "--seed", "3", "--out", str(out), "--compare-reference")
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (64, 48), "RGB")
    lines = result.stdout.splitlines()
    assert "fluxrt generate: 64x48, 2 steps, seed 3, torch.float32 on cpu" in lines[0]
    assert lines[3].split() == ["step", "reference", "fluxrt"] and lines[4].split()[0] == "1"
    step_ms = [float(ms) for line in lines[4:6] for ms in line.split()[1:]]
    assert len(step_ms) == 4 and min(step_ms) > 0  # a step that printed 0.00 was not timed
    assert lines[6].startswith("median") and "the reference's speed" in lines[6]
    assert "fluxrt vs reference image: max |difference|" in lines[7] and lines[8] == f"wrote {out}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]  # no temp file left beside it


def test_same_seed_same_bytes(tmp_path):
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, ("5", "5", "6")):
        result = run("generate", *SMALL, "--no-compile", "--seed", seed, "--out", str(path))
        assert result.returncode == 0, result.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_step_times_are_at_least_a_transformer_call():
    """generate's per-step latency includes each step's transformer call: the median step is at least half the
    fastest of a few independently timed calls of the same transformer on a step's inputs (half: noise on a shared
    CPU can only slow the independent calls down, never make a step that skipped the call look long)."""
    pipe = tiny_random_pipeline(device="cpu", compile=False, progress=False)
    width = height = 64
    _, step_seconds = cli._timed(pipe, dict(prompt="a red apple", width=width, height=height, num_steps=3,
                                            guidance=3.5, seed=0))
    txt, vec = pipe.encode_prompt(["a red apple"])
    img = sampling.pack(sampling.get_noise(1, height, width, seed=[0], dtype=pipe.dtype, device=pipe.device))
    inputs = dict(img=img, img_ids=sampling.prepare_img_ids(1, height, width, device=pipe.device), txt=txt,
                  txt_ids=sampling.prepare_txt_ids(1, txt.shape[1], device=pipe.device), y=vec,
                  timesteps=torch.full((1,), 0.75), guidance=torch.full((1,), 3.5))
    call_seconds = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            pipe.transformer(**inputs)
            call_seconds.append(time.perf_counter() - start)
    assert len(step_seconds) == 3
    assert statistics.median(step_seconds) >= 0.5 * min(call_seconds), (step_seconds, call_seconds)
