"""`python -m fluxrt generate` with the built-in tiny-random model: writes the PNG, prints the latency table, same
seed -> same bytes; every bad input gives one line on stderr, exit 2 and no file."""

import subprocess
import sys

import pytest
from PIL import Image

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


@pytest.mark.parametrize("args, message", [
    (("--width", "100"), "--width must be a multiple of 16 between 16 and 4096, got 100"),
    (("--height", "40"), "--height must be a multiple of 16 between 16 and 4096, got 40"),
    (("--steps", "0"), "--steps must be >= 1, got 0"),
    (("--model", "no/such/folder"), "--model 'no/such/folder' does not exist (a local FLUX folder or file, or tiny-random)"),
    (("--quantize", "fp8"), "--quantize fp8 (W8A8) needs an FP8-capable CUDA GPU (sm_89+: Ada, Hopper, Blackwell) and "
                            "none is in use (device cpu); use --quantize fp8-weight"),
    (("--quantize", "fp8-weight", "--no-compile"), "--quantize and --compare-reference need the compiled transformer; "
                                                   "drop --no-compile"),
    (("--device", "gpu"), "--device 'gpu' is not a device (e.g. cpu, cuda, cuda:1)"),
])
def test_bad_arguments_give_one_line(tmp_path, args, message):
    result = run("generate", *SMALL, "--device", "cpu", *args, "--out", str(tmp_path / "x.png"))
    assert (result.returncode, result.stderr, result.stdout) == (2, f"fluxrt: error: {message}\n", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("blocker/x.png", "cannot write --out '{tmp}/blocker/x.png': '{tmp}/blocker' is a file, not a folder"),
    ("x.jpg", "--out must name a .png file, got '{tmp}/x.jpg'"),
    ("folder.png", "--out '{tmp}/folder.png' is a folder; name a .png file"),
])
def test_unwritable_output_gives_one_line(tmp_path, out, message):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "folder.png").mkdir()
    result = run("generate", *SMALL, "--out", str(tmp_path / out))
    assert (result.returncode, result.stderr) == (2, f"fluxrt: error: {message.format(tmp=tmp_path)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder.png"]


def test_a_model_that_fails_to_load_leaves_no_file(tmp_path):
    (tmp_path / "model").mkdir()  # exists, but holds no FLUX
    result = run("generate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("fluxrt: error: ") and "no transformer/ folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_usage_errors_exit_2():
    result = run("generate", "--steps", "many")
    assert result.returncode == 2 and "invalid int value: 'many'" in result.stderr
