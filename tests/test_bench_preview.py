"""benchmarks/bench_preview.py, the preview-cost benchmark (issue 23): its CPU run end to end (files, labelled rows
whose numbers are finite, positive and consistent), the verdict against the bound and the exit status it gives, the
server's PNG encode, and one clear error for each bad flag with nothing written."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_preview.py"
spec = importlib.util.spec_from_file_location("bench_preview", SCRIPT)
bench_preview = importlib.util.module_from_spec(spec)
sys.modules["bench_preview"] = bench_preview  # its dataclass resolves its annotations through sys.modules
spec.loader.exec_module(bench_preview)

SIZES = ("64x64", "32x48")  # WIDTHxHEIGHT; one not square, so a swapped width and height shows
TIMES = ("step_ms", "first_call_s", "preview_ms", "off_thread_ms", "ratio_pct", "off_thread_pct")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench_preview") / "preview.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--size", *SIZES, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"bench_preview.py --dry-run failed:\n{run.stderr[-4000:]}"
    assert bench_preview.CPU_LABEL in run.stdout, run.stdout
    return out, json.loads(out.read_text())


def test_the_cpu_run_writes_a_labelled_json_and_table(dry_run):
    out, result = dry_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["preview.json", "preview.md"], "files left or missing"
    meta = result["meta"]
    assert meta["label"] == bench_preview.CPU_LABEL and meta["gpu"] is None, meta
    plan = bench_preview.DRY_RUN_PLAN
    assert (meta["model"], meta["iters"], meta["warmup"]) == (plan.model, plan.iters, plan.warmup), meta
    assert meta["bound_pct"] == bench_preview.BOUND_PCT and meta["impl"] == "fluxrt-bf16", meta
    table = out.with_suffix(".md").read_text()
    assert bench_preview.CPU_LABEL in table.splitlines()[0], table
    for row in result["rows"]:
        assert f"| {row['width']} | {row['height']} |" in table, (row, table)


def test_the_cpu_rows_are_finite_positive_and_consistent(dry_run):
    _, result = dry_run
    assert [f"{r['width']}x{r['height']}" for r in result["rows"]] == list(SIZES), result["rows"]
    assert math.isfinite(result["meta"]["fit_s"]) and result["meta"]["fit_s"] > 0, result["meta"]
    for row in result["rows"]:
        for name in TIMES:
            assert isinstance(row[name], float) and math.isfinite(row[name]) and row[name] > 0, (name, row)
        assert row["latent_pixels"] == row["width"] * row["height"] // 64, row
        assert math.isclose(row["ratio_pct"], 100 * row["preview_ms"] / row["step_ms"], rel_tol=1e-9), row
        assert math.isclose(row["off_thread_pct"], 100 * row["off_thread_ms"] / row["step_ms"], rel_tol=1e-9), row
        assert row["preview_gpu_ms"] is None and row["verdict"] == "not judged (CPU)", row


def test_the_verdict_is_judged_against_the_bound_on_flux_on_a_gpu():
    bound, step = bench_preview.BOUND_PCT, 123.0
    row = lambda share: {"preview_ms": step * share / 100, "step_ms": step, "off_thread_ms": 1.0}  # noqa: E731
    assert bench_preview.judge(row(bound * 0.99), None)["verdict"] == "PASS"
    assert bench_preview.judge(row(bound), None)["verdict"] == "FAIL", "a preview at the bound is not below it"
    assert bench_preview.judge(row(bound * 0.5), "CPU")["verdict"] == "not judged (CPU)"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    flux, tiny = (bench_preview.dataclasses.replace(bench_preview.CPU_PLAN, model=m) for m in ("flux-dev", "tiny"))
    assert bench_preview.unjudged_because(flux, cuda) is None
    assert bench_preview.unjudged_because(tiny, cuda) == "tiny config"
    assert bench_preview.unjudged_because(flux, cpu) == "CPU"


def test_only_a_full_gpu_run_writes_among_the_results(monkeypatch):
    monkeypatch.setattr(bench_preview._common, "gpu_slug", lambda: "h200")  # no GPU here to name
    now = bench_preview.datetime(2026, 12, 1, tzinfo=bench_preview.timezone.utc)
    cuda, cpu, results = torch.device("cuda"), torch.device("cpu"), bench_preview._common.RESULTS
    assert bench_preview.default_output(cuda, now, dry_run=False) == results / "preview_2026-12-01_h200.json"
    for device, dry_run in ((cuda, True), (cpu, False), (cpu, True)):
        out = bench_preview.default_output(device, now, dry_run)
        assert out.parent == Path(bench_preview.tempfile.gettempdir()), (device, dry_run, out)
        assert out.name.startswith("fluxrt_preview_20261201-") and out.suffix == ".json", out


def _fake_measure(verdict: str):
    def measure(plan, device, seed=0):
        row = {"width": 64, "height": 64, "preview_ms": 1.0, "step_ms": 10.0, "ratio_pct": 10.0, "verdict": verdict}
        return [row], {"model": plan.model}
    return measure


@pytest.mark.parametrize("verdict, status", [("FAIL", 1), ("PASS", 0), ("not judged (CPU)", 0)])
def test_a_failed_bound_is_written_and_exits_1(tmp_path, monkeypatch, verdict, status):
    monkeypatch.setattr(bench_preview, "measure", _fake_measure(verdict))
    out = tmp_path / "p.json"
    assert bench_preview.main(["--out", str(out)]) == status
    assert json.loads(out.read_text())["rows"][0]["verdict"] == verdict and out.with_suffix(".md").exists()


def test_a_failed_run_leaves_no_files(tmp_path, monkeypatch):
    def broken(plan, device, seed=0):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(bench_preview, "measure", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        bench_preview.main(["--out", str(tmp_path / "sub" / "p.json")])
    assert list(tmp_path.iterdir()) == [], "a failed run left files or folders"


@pytest.mark.parametrize("argv, message", [
    (["--size", "100x64"], "--size '100x64': width must be a multiple of 16"),
    (["--size", "64"], "--size '64' must be WIDTHxHEIGHT"),
    (["--iters", "0"], "--iters must be between 1 and"),
    (["--warmup", "-1"], "--warmup must be between 0 and"),
    (["--out", "{tmp}/p.txt"], "--out must name a .json file"),
    (["--out", "{tmp}/folder.json"], "--out '{tmp}/folder.json' is a folder; name a .json file"),
    (["--out", "{tmp}/taken.json"], "--out's table '{tmp}/taken.md' is a folder"),
])
def test_bad_flags_get_one_clear_error_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    for folder in ("taken.md", "folder.json"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(bench_preview, "measure", lambda *a, **k: pytest.fail("a bad flag was measured"))
    with pytest.raises(SystemExit) as raised:
        bench_preview.main([arg.format(tmp=tmp_path) for arg in argv])
    text = capsys.readouterr().err + (raised.value.code if isinstance(raised.value.code, str) else "")
    lines = [line for line in text.splitlines() if "error" in line]
    assert raised.value.code != 0 and len(lines) == 1, text
    assert message.format(tmp=tmp_path) in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "taken.md"], "a bad flag left files behind"
