"""benchmarks/eval_tiny.py: the FP8 quality baselines of the embedded trained model, run as a user runs it (a
subprocess, --quick) against fluxrt/weights/tiny. The model folder is part of the package: its absence fails."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxrt.pipeline import sampling_defaults
from fluxrt.tiny import TRAINED

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "eval_tiny.py"
OPS = {"fp8_linear", "w8a8_linear", "modulated_layer_norm_fp8", "gated_residual_norm_fp8", "quantize_rows",
       "joint_attention_fp8", "joint_attention_fp8_out"}
VARIANTS = {"fp8-weight": ("fp8_linear", "torch"), "fp8": ("w8a8_linear", "scaled_mm")}  # what each must have run
QUICK_SCENES = 8
WEIGHT_ONLY_PSNR_FLOOR = 20.0  # dB vs the fp32 images; e4m3 weights (~31 dB per linear) keep far above it
W8A8_PSNR_FLOOR = 15.0


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> tuple[dict, str]:
    assert (TRAINED / "model_index.json").is_file(), (
        f"the embedded trained model is missing ({TRAINED}); it ships with fluxrt: "
        f"python -m fluxrt.train_tiny --out {TRAINED}")
    out = tmp_path_factory.mktemp("eval_tiny") / "quality.json"
    run = run_script("--quick", "--out", str(out))
    assert run.returncode == 0, f"eval_tiny.py --quick failed:\n{run.stderr[-4000:]}"
    return json.loads(out.read_text()), run.stdout


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_run_records_its_setup_and_environment(quick_results):
    results, _ = quick_results
    assert set(results) == {"what", "environment", "setup", "images", "ops"}
    env = results["environment"]
    assert env["device"] == "cpu" and env["cpu"] and env["torch"] == torch.__version__
    assert env["commit"] and env["date"]
    setup, defaults = results["setup"], sampling_defaults(TRAINED)
    assert setup["scenes"] == QUICK_SCENES and setup["capture_calls"]
    assert setup["calls_per_step"] == 2 and setup["true_cfg_scale"] == defaults["true_cfg_scale"]  # prompt, negative
    calls = defaults["num_steps"] * setup["calls_per_step"]
    assert all(0 <= call < calls for call in setup["capture_calls"]) and calls - 1 in setup["capture_calls"], setup
    assert (setup["steps"], setup["width"], setup["height"]) == (defaults["num_steps"], defaults["width"],
                                                                 defaults["height"])


def test_quick_run_grades_every_variant(quick_results):
    images = quick_results[0]["images"]
    assert set(images) == {"rendered", "fp32", *VARIANTS}
    for name, row in images.items():
        adherence = row["adherence"]
        assert adherence["n"] == QUICK_SCENES, name
        assert all(_is_number(adherence[k]) and 0 <= adherence[k] <= 1 for k in ("colour", "shape", "both")), name


@pytest.mark.parametrize("variant, floor", [("fp8-weight", WEIGHT_ONLY_PSNR_FLOOR), ("fp8", W8A8_PSNR_FLOOR)])
def test_fp8_images_are_close_to_fp32_and_really_quantized(quick_results, variant, floor):
    row = quick_results[0]["images"][variant]
    # finite: identical images (inf dB) would mean the variant ran unquantized
    assert all(_is_number(row[k]) for k in ("psnr_db_min", "psnr_db_median", "psnr_db_mean")), row
    assert floor < row["psnr_db_min"] <= min(row["psnr_db_median"], row["psnr_db_mean"])
    op, backend = VARIANTS[variant]
    assert backend in row["ran"][op], row["ran"]


def test_every_fp8_op_has_a_positive_sqnr_on_trained_activations(quick_results):
    results, stdout = quick_results
    assert set(results["ops"]) == OPS
    for op, row in results["ops"].items():
        layers = row["per_layer"]
        assert row["layers"] == len(layers) >= 1, op
        assert all(_is_number(v) and v > 0 for v in layers.values()), (op, layers)
        assert row["min_db"] == layers[row["worst_layer"]] == min(layers.values()), op
        assert row["min_db"] <= row["median_db"], op
        assert f"| {op} |" in stdout, f"{op} missing from the printed table"


def test_missing_model_folder_is_one_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "quality.json"
    run = run_script("--quick", "--model", str(tmp_path / "no-such-model"), "--out", str(out))
    assert run.returncode != 0
    assert "no model_index.json" in run.stderr and "fluxrt.train_tiny" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_count_below_one_is_refused_before_loading(tmp_path):
    out = tmp_path / "quality.json"
    run = run_script("--count", "0", "--model", str(tmp_path / "no-such-model"), "--out", str(out))
    assert run.returncode == 2 and "--count must be at least 1, got 0" in run.stderr, run.stderr
    assert not out.exists()
