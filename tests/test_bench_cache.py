"""benchmarks/bench_cache.py, the step cache's quality harness (issue 22): its --smoke run as CI runs it (files,
consistent rows, exact uncached and threshold-0 rows), its transformer-work model against torch's FLOP counter on the
reference model, its PSNR and SSIM on cases whose answer is known in closed form, the rule that suggests defaults,
LPIPS when the package is there, and its flag errors."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from fluxrt.config import FluxConfig
from fluxrt.reference import Flux

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cache.py"
spec = importlib.util.spec_from_file_location("bench_cache", SCRIPT)
bench_cache = importlib.util.module_from_spec(spec)
sys.modules["bench_cache"] = bench_cache  # its dataclasses resolve their annotations through sys.modules
spec.loader.exec_module(bench_cache)

C1 = 0.01**2  # SSIM's luminance constant for pixels in [0, 1] (Wang et al. 2004: (K1 L)^2, K1 = 0.01, L = 1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench_cache") / "cache.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"bench_cache.py --smoke failed:\n{run.stderr[-4000:]}"
    return out, json.loads(out.read_text())


def _rows(results: dict) -> dict[str, dict]:
    return {row["setting"]: row for row in results["rows"]}


def test_smoke_writes_the_table_json_and_plot(smoke):
    out, results = smoke
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache.json", "cache.md", "cache.png"]
    assert [row["setting"] for row in results["rows"]] == list(bench_cache.SMOKE["settings"])
    meta = results["meta"]
    assert (meta["images"], meta["steps"], meta["device"]) == (bench_cache.SMOKE["prompts"],
                                                               bench_cache.SMOKE["steps"], "cpu")
    assert meta["calls_per_image"] == 2 * meta["steps"], meta  # the tiny model runs true CFG: two passes a step
    table = out.with_suffix(".md").read_text()
    assert all(f"| {row['setting']} |" in table for row in results["rows"]), table
    assert "not a GPU claim" in table and set(results["suggested"]) == {"fbc", "taylorseer"}
    with Image.open(out.with_suffix(".png")) as plot:
        assert plot.format == "PNG" and min(plot.size) > 100, plot


def test_smoke_rows_are_consistent(smoke):
    _, results = smoke
    meta = results["meta"]
    share = meta["work"]
    for row in results["rows"]:
        name = row["setting"]
        assert row["computed"] + row["skipped"] == row["calls"] == row["images"] * meta["calls_per_image"], row
        skip_share = {"fbc": share["first_block_skip_share"], "taylorseer": share["overhead_share"]}.get(
            row["method"], 1.0)
        expected = row["calls"] / (row["computed"] + row["skipped"] * skip_share)
        assert math.isclose(row["speedup"], expected, rel_tol=1e-9), (name, row["speedup"], expected)
        assert 1 <= row["speedup"] <= row["steps_speedup"], row  # a skip costs something, never more than a call
        assert -1 <= row["ssim_min"] <= row["ssim_mean"] <= 1 + 1e-12, row
        worst = math.inf if row["psnr_db_min"] is None else row["psnr_db_min"]
        assert (row["changed_images"] > 0) == (worst < bench_cache.CHANGED_DB), row
        assert row["adherence"]["n"] == row["images"], row
        none = _rows(results)["none"]
        assert math.isclose(row["wall_speedup"], none["denoise_s"] / row["denoise_s"], rel_tol=1e-9), row
        delta = 100 * (row["adherence"]["all"] - meta["reference_adherence"]["all"])
        assert math.isclose(row["adherence_delta_points"], delta, abs_tol=1e-9), row


@pytest.mark.parametrize("setting", ["none", "fbc:0"])
def test_uncached_and_threshold_zero_rows_are_exact(smoke, setting):
    """An uncached rerun and First-Block Cache at threshold 0 (never skips) give the reference images bit for bit."""
    row = _rows(smoke[1])[setting]
    assert row["skipped"] == 0 and row["speedup"] == 1, row
    assert row["psnr_db"] is None and row["psnr_db_min"] is None, row  # JSON's spelling of inf dB
    assert row["identical_images"] == row["images"] and row["ssim_min"] == pytest.approx(1, abs=1e-12), row
    assert row["adherence_delta_points"] == 0, row


@pytest.mark.parametrize("setting", ["fbc:0.5", "taylorseer:1:2:2"])
def test_cached_rows_skip_and_change_the_images(smoke, setting):
    row = _rows(smoke[1])[setting]
    assert row["skipped"] > 0 and row["speedup"] > 1, row
    assert row["identical_images"] < row["images"] and row["psnr_db"] is not None, row
    assert row["psnr_db_min"] <= row["psnr_db"] and row["ssim_mean"] < 1, row


def test_work_model_matches_torch_flop_counter_on_the_reference():
    """Twice the model's multiply-adds are the FLOPs torch counts on the reference model (weights only, batch 1): the
    whole call, the first double block and all blocks, each block without its modulation linears (FastFlux computes
    those for every block in one batched GEMV, so a skip still pays them: overhead)."""
    config, text, image = FluxConfig.preset("tiny"), 7, 24
    with torch.device("meta"):
        flux = Flux(config)
        with FlopCounterMode(display=False) as counter:
            flux(img=torch.empty(1, image, config.in_channels), img_ids=torch.zeros(1, image, 3),
                 txt=torch.empty(1, text, config.context_in_dim), txt_ids=torch.zeros(1, text, 3),
                 timesteps=torch.empty(1), y=torch.empty(1, config.vec_in_dim), guidance=torch.empty(1))
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    def block(name: str, modulations: tuple[str, ...]) -> int:
        return counts[name] - sum(counts[f"{name}.{m}"] for m in modulations)

    work = bench_cache.WorkModel.of(config, image, text)
    doubles = [block(f"Flux.double_blocks.{i}", ("img_mod", "txt_mod")) for i in range(config.depth)]
    singles = [block(f"Flux.single_blocks.{i}", ("modulation",)) for i in range(config.depth_single_blocks)]
    assert 2 * work.full == counts["Flux"]
    assert 2 * work.first_block == doubles[0]
    assert 2 * work.blocks == sum(doubles) + sum(singles)


def test_speedup_prices_each_skip_at_its_method_cost():
    work = bench_cache.WorkModel(first_block=10.0, blocks=40.0, overhead=2.0)  # a call: 42; an FBC skip: 12
    assert work.speedup(4, 4, 0, "fbc") == 1
    assert work.speedup(4, 2, 2, "fbc") == pytest.approx(4 * 42 / (2 * 42 + 2 * 12))
    assert work.speedup(4, 2, 2, "taylorseer") == pytest.approx(4 * 42 / (2 * 42 + 2 * 2))


def _drawn(images: torch.Tensor) -> "bench_cache.Drawn":
    return bench_cache.Drawn(images, seconds=0.0, computed=[1] * len(images), skipped=[0] * len(images))


def test_psnr_of_a_known_offset():
    reference = torch.rand(2, 3, 16, 16) * 0.8
    shifted = reference + 0.1  # MSE 0.01 everywhere: 20 dB
    assert bench_cache.mse(shifted, reference) == pytest.approx([0.01, 0.01])
    assert bench_cache.psnr_db(0.01) == pytest.approx(20.0) and bench_cache.psnr_db(0.0) == math.inf


def test_set_psnr_is_of_the_mean_mse_and_inf_only_when_all_are_identical():
    reference = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 0.4
    off = torch.stack((reference[0] + 0.05, reference[1], reference[2] + 0.5))  # 26 dB, identical, 6 dB
    tally = bench_cache.Tally()
    tally.add(_drawn(off), reference, None)
    row = bench_cache.quality(tally)
    assert row["psnr_db"] == pytest.approx(10 * math.log10(3 / (0.05**2 + 0.5**2))), row  # of the mean MSE
    assert row["psnr_db_min"] == pytest.approx(10 * math.log10(1 / 0.5**2)), row
    assert row["identical_images"] == 1 and row["changed_images"] == 1, row  # only the 6 dB one is below 20 dB
    exact = bench_cache.Tally()
    exact.add(_drawn(reference), reference, None)
    assert bench_cache.quality(exact)["psnr_db"] is None  # inf dB, as JSON spells it


def test_adherence_of_batches_is_over_all_their_images():
    tally = bench_cache.Tally()
    tally.adherence = [{"colour": 1.0, "all": 1.0, "n": 1}, {"colour": 0.5, "all": 0.0, "n": 3}]
    # 1 image at colour 1.0 and 3 at 0.5: (1 + 1.5) / 4; all: 1 of 4
    assert tally.adherence_total() == {"colour": pytest.approx(0.625), "all": pytest.approx(0.25), "n": 4}


def test_ssim_of_an_image_with_itself_is_one():
    images = torch.rand(3, 3, 32, 32)
    assert bench_cache.ssim(images, images) == pytest.approx([1.0] * 3, abs=1e-12)


@pytest.mark.parametrize("a, b", [(0.2, 0.6), (0.0, 1.0), (0.9, 0.85)])
def test_ssim_of_two_flat_images_is_the_luminance_term(a, b):
    """Flat images have no variance: contrast and structure are (0 + C2) / (0 + C2) = 1, and SSIM is the luminance
    term (2ab + C1) / (a^2 + b^2 + C1) at every position."""
    first, second = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert bench_cache.ssim(first, second) == pytest.approx([expected], rel=1e-9)


def test_ssim_window_is_the_standard_gaussian():
    """11x11, sums to 1 per channel, separable Gaussian of sigma 1.5: each step from the centre scales a weight by
    exp(-(d1^2 - d0^2) / (2 sigma^2))."""
    window = bench_cache._gaussian_window(3)
    assert window.shape == (3, 1, 11, 11)
    torch.testing.assert_close(window.sum(dim=(1, 2, 3)), torch.ones(3, dtype=torch.float64))
    centre = window[0, 0, 5]
    assert centre[6] / centre[5] == pytest.approx(math.exp(-1 / (2 * 1.5**2)))
    assert centre[8] / centre[5] == pytest.approx(math.exp(-9 / (2 * 1.5**2)))
    torch.testing.assert_close(window[0, 0], window[0, 0].T)


def test_ssim_orders_known_distortions():
    """More noise, less SSIM; blur is below 1; an inverted image is anti-correlated (below 0)."""
    generator = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, 16, 16, generator=generator), size=64, mode="bilinear") * 0.8 + 0.1
    noise = torch.randn(image.shape, generator=generator)
    scores = [bench_cache.ssim(image + std * noise, image)[0] for std in (0.01, 0.05, 0.2)]
    assert 1 > scores[0] > scores[1] > scores[2], scores
    blurred = F.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    assert bench_cache.ssim(blurred, image)[0] < 1
    assert bench_cache.ssim(1 - image, image)[0] < 0


def test_ssim_refuses_shapes_it_cannot_grade():
    with pytest.raises(ValueError, match="H, W >= 11"):
        bench_cache.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        bench_cache.ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


def _row(setting: str, speedup: float, psnr: float | None, delta: float | None = None, changed: int = 0) -> dict:
    row = {"setting": setting, "method": bench_cache.method_of(setting), "skipped": 1, "speedup": speedup,
           "psnr_db": psnr, "changed_images": changed}
    return row if delta is None else {**row, "adherence_delta_points": delta}


def test_suggest_picks_the_fastest_setting_that_keeps_quality():
    rows = [_row("none", 1.0, None, 0.0), _row("fbc:0.05", 1.2, 41.0, 0.0), _row("fbc:0.1", 1.5, 31.0, -0.8),
            _row("fbc:0.2", 2.0, 28.0, 0.0),  # below 30 dB
            _row("fbc:0.3", 2.5, 35.0, -2.0),  # adherence 2 points down
            _row("fbc:0.4", 2.6, 32.0, 0.0, changed=1),  # one image shows something else
            _row("taylorseer:1:2:3", 1.8, 20.0, 0.0)]
    assert bench_cache.suggest(rows) == {"fbc": "fbc:0.1", "taylorseer": None}
    without_adherence = [_row("fbc:0.1", 1.5, 31.0), _row("fbc:0.3", 2.5, 35.0), _row("taylorseer:1:2:3", 1.8, 30.5)]
    assert bench_cache.suggest(without_adherence) == {"fbc": "fbc:0.3", "taylorseer": "taylorseer:1:2:3"}


def test_suggest_breaks_a_speedup_tie_by_psnr():
    rows = [_row("taylorseer:1:3:3", 2.18, 38.0, 0.0), _row("taylorseer:1:4:5", 2.18, 49.5, 0.0),
            _row("fbc:0.1", 1.3, None, 0.0)]  # inf dB (identical) beats any finite PSNR
    assert bench_cache.suggest(rows) == {"fbc": "fbc:0.1", "taylorseer": "taylorseer:1:4:5"}


def test_lpips_is_measured_when_the_package_imports(monkeypatch):
    """The scorer hands lpips images in [-1, 1]; a fake LPIPS (mean |a - b|) shows the scaling and the plumbing."""
    fake = types.ModuleType("lpips")

    class LPIPS:
        def __init__(self, net: str, verbose: bool):
            assert net == "alex"

        def eval(self):
            return self

        def __call__(self, a, b):
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    fake.LPIPS = LPIPS
    monkeypatch.setitem(sys.modules, "lpips", fake)
    images, reference = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    expected = 2 * (images - reference).abs().mean(dim=(1, 2, 3))
    score = bench_cache.lpips_scorer()
    assert score(images, reference) == pytest.approx(expected.tolist())
    tally = bench_cache.Tally()
    tally.add(_drawn(images), reference, None, score)
    assert bench_cache.quality(tally)["lpips_mean"] == pytest.approx(expected.mean().item())
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips raises ImportError
    assert bench_cache.lpips_scorer() is None


@pytest.mark.parametrize("args, message", [
    (["--settings", "fbc:abc"], "--settings: cache 'fbc:abc': a field is not a number"),
    (["--settings", "fbc:-1"], "--settings: cache 'fbc:-1': FirstBlockCache threshold must be"),
    (["--settings", "fbc:0.1", "fbc:0.10"], "--settings lists fbc:0.1 more than once"),
    (["--prompts", "0"], "--prompts must be a positive int, got 0"),
    (["--size", "big"], "--size must be SIZE or WxH"),
    (["--size", "100"], "--size width must be a multiple of 16"),
    (["--steps", "0"], "--steps must be"),
])
def test_bad_flags_are_one_clear_error(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        bench_cache.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_model_is_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out" / "cache.json"
    with pytest.raises(SystemExit, match="cannot load --model .*missing"):
        bench_cache.main(["--model", str(tmp_path / "missing"), "--smoke", "--out", str(out)])
    assert not out.parent.exists()
