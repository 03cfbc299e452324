"""benchmarks/cp_model.py, the paper model of context parallelism (issue 21): it runs as a user runs it, its byte
counts equal formulas written here from FLUX.1-dev's shapes, its FLOP counts equal torch's FLOP counter on the
reference modules, and its predictions keep the properties any sound model must have."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fluxrt.config import FluxConfig
from fluxrt.reference import Flux
from fluxrt.reference.autoencoder import AutoEncoderParams, Decoder

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cp_model.py"
spec = importlib.util.spec_from_file_location("cp_model", SCRIPT)
cp = importlib.util.module_from_spec(spec)
sys.modules["cp_model"] = cp  # its dataclasses resolve their annotations through sys.modules
spec.loader.exec_module(cp)

# FLUX.1-dev from FLUX_FACTS.md, written out here so the script's reading of fluxrt.config is checked, not reused
HIDDEN, MLP, HEADS, LAYERS, TEXT = 3072, 12288, 24, 19 + 38, 512
TOKENS = {1024: 4096 + TEXT, 2048: 16384 + TEXT}
WORLDS = (2, 4, 8)
GPU, NVLINK, PCIE = cp.GPUS["h100"], cp.TOPOLOGIES["nvlink"], cp.TOPOLOGIES["pcie"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def every_plan():
    """(world, ulysses degree) for each degree dividing both the world and the 24 heads."""
    return [(n, u) for n in WORLDS for u in range(1, n + 1) if n % u == 0 and HEADS % u == 0]


@pytest.fixture(scope="module")
def report() -> dict:
    run = run_script("--json")
    assert run.returncode == 0, f"cp_model.py --json failed:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout)


def test_the_script_prints_one_row_per_plan_and_a_verdict():
    run = run_script()
    assert run.returncode == 0, f"cp_model.py failed:\n{run.stderr[-3000:]}"
    for size, tokens in TOKENS.items():
        assert f"### {size}² ({tokens - TEXT} image + {TEXT} text tokens)" in run.stdout, run.stdout[:2000]
    rows = [line for line in run.stdout.splitlines() if line.startswith(tuple(f"| {n} | " for n in WORLDS))]
    assert len(rows) == len(TOKENS) * len(every_plan()), rows
    assert "Verdict: " in run.stdout and "3.2x" in run.stdout
    assert "| xDiT |" in run.stdout and "| ParaAttention |" in run.stdout


def test_json_has_every_plan_size_and_topology(report):
    expected = {(size, topo, n, u) for size in TOKENS for topo in ("nvlink", "pcie", "2x4-nvlink-ib")
                for n, u in every_plan()}
    assert {(r["size"], r["topology"], r["world"], r["ulysses"]) for r in report["rows"]} == expected
    assert report["goal"] == 3.2 and report["verdict"]


def test_an_unknown_gpu_is_one_usage_error():
    run = run_script("--gpu", "v100")
    assert run.returncode == 2 and "invalid choice: 'v100'" in run.stderr, run.stderr


def test_an_image_size_that_is_not_a_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="1000x1024: FLUX image sizes are positive multiples of 16 pixels"):
        cp.FLUX.image_tokens(1000, 1024)


def attention_bytes(size: int, n: int, u: int, bytes_per_element: int = 2) -> float:
    """Bytes one rank sends per step: Ulysses 4 all-to-alls of its S/N x hidden shard per attention, (u-1)/u leaving;
    ring: its K and V (S/N x hidden each) passed on ring-1 times."""
    shard = TOKENS[size] / n * HIDDEN * bytes_per_element
    return LAYERS * (4 * shard * (u - 1) / u + 2 * shard * (n // u - 1))


@pytest.mark.parametrize("size", sorted(TOKENS))
def test_ulysses_bytes_per_rank_fall_as_the_world_grows(size):
    sent = [cp.predict(cp.Plan(n, n), size, GPU, NVLINK).attention_bytes for n in WORLDS]
    expected = [LAYERS * 4 * TOKENS[size] * HIDDEN * 2 * (n - 1) / n**2 for n in WORLDS]
    assert sent == pytest.approx(expected, rel=1e-12)
    assert sent[0] > sent[1] > sent[2], sent


@pytest.mark.parametrize("size", sorted(TOKENS))
def test_ring_bytes_per_rank_stay_near_constant_in_the_world_size(size):
    sent = [cp.predict(cp.Plan(n, 1), size, GPU, NVLINK).attention_bytes for n in WORLDS]
    expected = [2 * TOKENS[size] * HIDDEN * 2 * (n - 1) / n * LAYERS for n in WORLDS]
    assert sent == pytest.approx(expected, rel=1e-12)
    assert max(sent) / min(sent) < 2, sent  # (N-1)/N: 1/2 at N = 2 up to 7/8 at N = 8


@pytest.mark.parametrize("size", sorted(TOKENS))
def test_usp_bytes_are_ulysses_at_u_equal_n_and_ring_at_u_equal_1(size):
    for n, u in every_plan():
        for wire in (1, 2, 4):  # fp8, bf16, fp32 on the wire
            step = cp.predict(cp.Plan(n, u), size, GPU, NVLINK, wire=wire)
            assert step.attention_bytes == pytest.approx(attention_bytes(size, n, u, wire), rel=1e-12), (n, u, wire)
    for n in WORLDS:
        assert attention_bytes(size, n, n) == pytest.approx(LAYERS * 4 * TOKENS[size] * HIDDEN * 2 * (n - 1) / n**2)
        assert attention_bytes(size, n, 1) == pytest.approx(LAYERS * 2 * TOKENS[size] * HIDDEN * 2 * (n - 1) / n)


def test_padding_rounds_each_stream_up_to_the_world_size():
    step = cp.predict(cp.Plan(3, 3), 1024, GPU, NVLINK)  # 512 text tokens -> 171 per rank, 4096 image -> 1366
    assert step.attention_bytes == pytest.approx(LAYERS * 4 * (171 + 1366) * HIDDEN * 2 * 2 / 3, rel=1e-12)


def test_speedup_never_exceeds_the_world_size(report):
    rows = report["rows"] + report["verdict_rows"]
    for row in rows:
        for key in ("speedup", "speedup_weights_hidden"):
            assert 0 < row[key] <= row["world"], row


def slower(topology, bandwidth: float = 1.0, latency: float = 1.0):
    """The same topology with every link's bandwidth divided by `bandwidth` and its latency times `latency`."""
    def link(l):
        return None if l is None else dataclasses.replace(l, nominal=l.nominal / bandwidth,
                                                          latency_s=l.latency_s * latency)
    return dataclasses.replace(topology, fast=link(topology.fast), slow=link(topology.slow))


@pytest.mark.parametrize("topology", ["nvlink", "pcie", "2x4-nvlink-ib"])
def test_a_slower_link_or_more_bytes_never_predicts_a_faster_step(topology):
    topo = cp.TOPOLOGIES[topology]
    worse = {"half the bandwidth": dict(topo=slower(topo, bandwidth=2)),
             "twice the latency": dict(topo=slower(topo, latency=2)), "fp32 on the wire": dict(wire=4)}
    for size in TOKENS:
        for n, u in every_plan():
            for variant in cp.VARIANTS:
                plan = cp.Plan(n, u)
                base = cp.predict(plan, size, GPU, topo, variant)
                for what, change in worse.items():
                    step = cp.predict(plan, size, GPU, change.get("topo", topo), variant, wire=change.get("wire", 2))
                    assert step.total >= base.total, (what, size, n, u, variant.name)
                    assert step.exposed >= base.exposed, (what, size, n, u, variant.name)


def test_overlapped_all_to_alls_show_at_least_one_chunk_and_at_most_all():
    chunked = cp.VARIANTS[-1]
    assert chunked.overlap_chunks > 1
    for size in TOKENS:
        for n, u in every_plan():
            step = cp.predict(cp.Plan(n, u), size, GPU, PCIE, chunked)
            link = step.ulysses_link
            assert link / chunked.overlap_chunks <= step.ulysses_exposed * (1 + 1e-12) <= link * (1 + 1e-12), (n, u)


def test_not_overlapped_all_to_alls_show_whole_and_ring_passes_show_at_most_whole():
    for size in TOKENS:
        for n, u in every_plan():
            for topo in (NVLINK, PCIE):
                step = cp.predict(cp.Plan(n, u), size, GPU, topo)
                assert step.ulysses_exposed == pytest.approx(step.ulysses_link), (size, n, u)
                assert 0 <= step.ring_exposed <= step.ring_link, (size, n, u)


def test_ring_transfers_hide_behind_long_blocks_and_show_behind_short_ones():
    """2048² on 2 NVLink GPUs: 8448 tokens per rank, far above the hiding point; on PCIe 2 GPUs at 1024²: 2304, far
    below it."""
    hidden = cp.predict(cp.Plan(2, 1), 2048, GPU, NVLINK)
    shown = cp.predict(cp.Plan(2, 1), 1024, GPU, PCIE)
    assert hidden.ring_exposed == 0 < hidden.ring_link
    assert shown.ring_exposed > 0.5 * shown.ring_link


def test_each_change_toward_the_goal_never_slows_a_step():
    for n, u in every_plan():
        steps = [cp.predict(cp.Plan(n, u), 1024, GPU, NVLINK, v).total for v in cp.VARIANTS]
        assert all(later <= earlier for earlier, later in zip(steps, steps[1:])), (n, u, steps)


@pytest.mark.parametrize("anchor", [cp.ANCHOR_H100, cp.ANCHOR_A100])
def test_the_calibration_reproduces_the_anchor_wall_time(anchor):
    gpu = next(g for g in cp.GPUS.values() if g.anchor == anchor and g.hbm == anchor.hbm)
    one = cp.predict(cp.Plan(1, 1), 1024, gpu, NVLINK).total
    extras = cp.pipeline_extras(cp.calibrated_rate(anchor), gpu.hbm)
    assert cp.STEPS * one + extras == pytest.approx(anchor.wall_s, rel=1e-3)


def test_model_counts_match_flux_facts():
    """FLUX_FACTS.md: 59.5 TF linear + 14.9 TF attention per 1024² step; modulation 3.2 B parameters."""
    per_stream = 3 * HIDDEN**2 + HIDDEN**2 + 2 * HIDDEN * MLP
    assert cp.FLUX.per_token_params == LAYERS * per_stream
    assert cp.FLUX.linear_flops(TEXT, 4096) == pytest.approx(59.5e12, rel=2e-3)
    assert LAYERS * cp.FLUX.attention_flops(TOKENS[1024]) == pytest.approx(14.9e12, rel=2e-3)
    assert cp.FLUX.modulation == pytest.approx(3.2e9, rel=0.02)  # "3.2 B": 3.23 B in the blocks + the final layer's


def test_weight_counts_equal_the_reference_parameters():
    """Block linears (read by every rank each step), modulation (+ the final adaLN) and the vector embedders of the
    tiny config, against the matrices fluxrt.reference.Flux holds."""
    cfg = FluxConfig.preset("tiny")
    model = cp.Flux.from_config(cfg)
    with torch.device("meta"):
        matrices = {name: p.numel() for name, p in Flux(cfg).named_parameters() if p.ndim == 2}
    blocks = sum(n for name, n in matrices.items() if "blocks." in name and "mod" not in name)
    modulation = sum(n for name, n in matrices.items() if "mod" in name)
    embedders = sum(n for name, n in matrices.items() if name.split(".")[0] in ("time_in", "vector_in", "guidance_in"))
    assert (model.block_weights, model.modulation, model.vector_embedders) == (blocks, modulation, embedders)


def test_transformer_flops_equal_torch_flop_counter_on_the_reference():
    """The tiny config through fluxrt.reference.Flux on the meta device: every matmul and attention counted by torch."""
    cfg = FluxConfig.preset("tiny")
    model = cp.Flux.from_config(cfg)
    text, image = 7, 24
    with torch.device("meta"):
        flux = Flux(cfg)
        with FlopCounterMode(display=False) as counter:
            flux(img=torch.empty(1, image, cfg.in_channels), img_ids=torch.zeros(1, image, 3),
                 txt=torch.empty(1, text, cfg.context_in_dim), txt_ids=torch.zeros(1, text, 3),
                 timesteps=torch.empty(1), y=torch.empty(1, cfg.vec_in_dim), guidance=torch.empty(1))
    gemvs = 2 * (model.modulation + model.vector_embedders)  # batch 1: 2 FLOPs per weight
    expected = model.linear_flops(text, image) + model.layers * model.attention_flops(text + image) + gemvs
    assert counter.get_total_flops() == expected


def test_vae_decoder_flops_equal_torch_flop_counter_on_the_reference():
    """FLUX's decoder at 64² pixels (8² latents) on the meta device; convolutions scale with pixels, so this checks
    every layer of the 1024² count."""
    with torch.device("meta"):
        decoder = Decoder(AutoEncoderParams())
        with FlopCounterMode(display=False) as counter:
            decoder(torch.empty(1, 16, 8, 8))
    assert counter.get_total_flops() == cp.vae_flops(64)


def test_vae_tiles_follow_fluxrt_vae():
    assert cp.vae_tiles(1024) == 1 and cp.vae_tiles(2048) == 9  # 256 latents: tiles at 0, 96, 128 per axis
