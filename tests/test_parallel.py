"""fluxrt.parallel on gloo: 2 and 4 CPU processes, the tiny model in fp32, against the single-process model.

Each world size is one launch of real processes (this file run as a script, one per rank) that runs every scheme for
that size and saves rank 0's outputs; the tests compare them with the unsharded model. The text and image lengths
(5 and 15 tokens) divide by neither 2 nor 4, so the padding and its mask are always exercised; with 4 ranks the last
rank's text shard is all padding.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import fluxrt
from fluxrt.config import default_axes_dim
from fluxrt import parallel
from fluxrt.tiny import TINY_AUTOENCODER
from ranks import free_port, run_ranks

BATCH = 2
# Input shapes: name -> (text tokens, latent grid rows, cols). "short" leaves the last of 4 ranks nothing but padding.
CASES = {"main": (5, 3, 5), "short": (2, 3, 1)}
LAUNCH_TIMEOUT_S = 60
PEER_TIMEOUT_S = 20  # init()'s collective timeout in the workers: the bound on noticing a dead peer
HANG_TIMEOUT_S = 3  # the same, in the test where a peer hangs, so that the timeout is what ends the wait
# The tiny preset has 2 heads, so Ulysses-2 moves one head per rank; 4 heads check the head order of the all-to-all.
TINY = fluxrt.FluxConfig.preset("tiny")
CONFIGS = {"tiny": TINY, "tiny-4-heads": dataclasses.replace(TINY, num_heads=4, axes_dim=default_axes_dim(32))}
# What each world size runs: name -> (scheme, ulysses_degree, config). Each runs on the reference's blocks
# (ParallelFlux) and compiled (fluxrt.compile(parallel=...)) with the torch backend; FUSED_TRITON names the runs also
# compiled with the Triton backend (in the interpreter: fp32, slow, so one run per world size).
RUNS = {
    2: {
        "ulysses": ("ulysses", None, "tiny"),
        "ulysses-4-heads": ("ulysses", None, "tiny-4-heads"),
        "ring": ("ring", None, "tiny"),
    },
    4: {
        "ring": ("ring", None, "tiny"),
        "usp-2x2": ("usp", 2, "tiny"),
        "usp-2x2-4-heads": ("usp", 2, "tiny-4-heads"),
        "ulysses-4-heads": ("ulysses", None, "tiny-4-heads"),
    },
}
FUSED_TRITON = {2: "ring", 4: "usp-2x2"}  # the 4-head config has head_dim 32: no Triton kernel


def _model(config: str = "tiny"):
    torch.manual_seed(0)
    return fluxrt.reference.Flux(CONFIGS[config]).eval()


def _inputs(params, case: str) -> dict:
    text_len, grid_h, grid_w = CASES[case]
    torch.manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(1, -1, 3).expand(BATCH, -1, -1)
    p = params
    return dict(
        img=torch.randn(BATCH, grid_h * grid_w, p.in_channels),
        img_ids=img_ids.float(),
        txt=torch.randn(BATCH, text_len, p.context_in_dim),
        txt_ids=torch.zeros(BATCH, text_len, 3),
        timesteps=torch.rand(BATCH),
        y=torch.randn(BATCH, p.vec_in_dim),
        guidance=torch.full((BATCH,), 3.5),
    )


def _worker(rank: int, world: int, port: int, out_path: str, backend: str) -> None:
    parallel.init(rank, world, backend=backend, master_port=port, timeout_s=PEER_TIMEOUT_S)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
    try:
        outputs = {}
        with torch.no_grad():
            for name, (scheme, ulysses_degree, config) in RUNS[world].items():
                variants = {name: lambda m: parallel.ParallelFlux(m, scheme, ulysses_degree)}
                for kernels in ("torch", "triton") if FUSED_TRITON[world] == name else ("torch",):
                    variants[f"{name}/fused-{kernels}"] = lambda m, kernels=kernels: fluxrt.compile(
                        m, parallel=scheme, ulysses_degree=ulysses_degree, backend=kernels)
                for variant, make in variants.items():
                    sharded = make(_model(config).to(device))
                    for case in CASES:
                        inputs = {key: value.to(device) for key, value in _inputs(TINY, case).items()}
                        outputs[variant, case] = sharded(**inputs).cpu()
        if rank == 0:
            torch.save(outputs, out_path)
    finally:
        parallel.destroy()


def _failing_worker(rank: int, world: int, port: int, out_path: str, hang: bool) -> None:
    """Rank 1 dies (or hangs) once the groups are built; rank 0 must fail with ParallelError, not wait forever.

    Rank 0 writes how long its forward took and the error, then exits 4; rank 1 exits 3.
    """
    timeout_s = HANG_TIMEOUT_S if hang else PEER_TIMEOUT_S
    parallel.init(rank, world, backend="gloo", master_port=port, timeout_s=timeout_s)
    model = _model()
    sharded = parallel.ParallelFlux(model, "ring")
    if rank == 1:
        _wait_for(Path(out_path) if hang else None)  # hang: stay silent until rank 0 has given up on us
        os._exit(3)
    start = time.monotonic()
    try:
        with torch.no_grad():
            sharded(**_inputs(model.params, "main"))
    except parallel.ParallelError as error:
        Path(out_path).write_text(f"{time.monotonic() - start}\n{error}")
        os._exit(4)  # a dead peer's process group cannot be torn down cleanly; exit as a real launcher would


def _wait_for(path: Path | None) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S / 2
    while path is not None and not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _run_ranks(world: int, out_path: Path, mode: str = "parity") -> tuple[list[int], list[str]]:
    """Run `world` ranks of this file as processes (tests/ranks.py: bounded, every one killed at the deadline)."""
    return run_ranks(lambda rank: [__file__, mode, str(out_path)], world, LAUNCH_TIMEOUT_S)


def _launch(world: int, out_path: Path, mode: str = "parity") -> dict:
    codes, logs = _run_ranks(world, out_path, mode)
    assert codes == [0] * world, f"ranks exited with {codes}:\n" + "\n".join(logs)
    return torch.load(out_path)


@pytest.fixture(scope="module", params=sorted(RUNS))
def launched(request, tmp_path_factory):
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"cp{world}") / "out.pt")


@pytest.fixture(scope="module")
def expected():
    outputs = {}
    with torch.no_grad():
        for config in CONFIGS:
            model = _model(config)
            for case in CASES:
                outputs[config, case] = model(**_inputs(model.params, case))
    return outputs


def test_every_scheme_matches_the_single_process_model(launched, expected):
    _assert_matches(*launched, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("world", sorted(RUNS))
def test_every_scheme_matches_the_single_process_model_on_nccl(world, expected, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs for NCCL, found {torch.cuda.device_count()}")
    _assert_matches(world, _launch(world, tmp_path / "out.pt", mode="parity-nccl"), expected)


def _assert_matches(world: int, outputs: dict, expected: dict) -> None:
    variants = [*RUNS[world], *(f"{name}/fused-torch" for name in RUNS[world]), f"{FUSED_TRITON[world]}/fused-triton"]
    assert sorted(outputs) == sorted((name, case) for name in variants for case in CASES), sorted(outputs)
    for (name, case), out in outputs.items():
        want = expected[RUNS[world][name.split("/")[0]][2], case]
        torch.testing.assert_close(
            out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=lambda m: f"{name}-{world} {case}: {m}"
        )


@pytest.mark.parametrize("hang", [False, True], ids=["dead-peer", "hung-peer"])
def test_a_failed_peer_gives_rank_0_one_clear_error_in_bounded_time(tmp_path, hang):
    codes, logs = _run_ranks(2, tmp_path / "error.txt", mode="hang" if hang else "die")
    assert codes == [4, 3], f"want rank 0 to catch ParallelError (4) and rank 1 to exit (3), got {codes}:\n{logs}"
    elapsed, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert "rank 0: the ring K/V exchange failed, so a peer rank died or timed out" in message, message
    # A dead peer closes its sockets (noticed at once); a hung one is noticed at the collective timeout.
    bound = HANG_TIMEOUT_S + 5 if hang else 5
    assert float(elapsed) < bound, f"rank 0 took {float(elapsed):.1f} s (bound {bound} s) to give up on its peer"


def test_ring_blocks_with_padding_merge_to_one_softmax_over_the_real_keys():
    """Three ring blocks of 3 keys each (as ranks 0..2 hold them), padding in two of them and a block of padding only:
    dropping the padding keys per block (KeyIndex) and merging by log-sum-exp is attention over the real keys."""
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 2, 9, 8)
    valid = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])  # [ring position, key]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid.reshape(1, -1))
    mesh = parallel.Mesh(rank=0, world_size=3, ulysses_degree=1, ring_degree=3, ulysses_group=None,
                         ring_ranks=(0, 1, 2))
    keys = parallel.KeyIndex(valid, mesh, torch.device("cpu"))
    assert keys.keys(1, k[:, :, 3:6], v[:, :, 3:6]) is None, "a block of padding only must be skipped"
    out = lse = None
    for source in (0, 2):
        block = slice(3 * source, 3 * source + 3)
        out, lse = parallel._merge(out, lse, *parallel._block_attention(q, *keys.keys(source, k[:, :, block],
                                                                                        v[:, :, block])))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scheme, world, degree, message",
    [
        ("zigzag", 2, None, "unknown context-parallel scheme 'zigzag'"),
        ("ulysses", 4, None, "Ulysses degree 4 must divide the 2 attention heads"),
        ("usp", 4, 3, "ulysses_degree 3 must divide the world size 4"),
        ("ring", 2, 2, "ulysses_degree is set by the scheme 'ring'"),
    ],
)
def test_bad_scheme_choices_are_refused_with_what_to_do(scheme, world, degree, message):
    with pytest.raises(ValueError, match=message):
        parallel._ulysses_degree(scheme, world, 2, degree)


@pytest.mark.parametrize(
    "scheme, world, heads, degree, want",
    [("ulysses", 4, 24, None, 4), ("ring", 3, 24, None, 1), ("usp", 8, 24, 2, 2), ("usp", 16, 24, None, 8)],
)
def test_ulysses_degree_per_scheme(scheme, world, heads, degree, want):
    assert parallel._ulysses_degree(scheme, world, heads, degree) == want


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({}, {}, "found no RANK/WORLD_SIZE: launch with torchrun"),
        ({"rank": 0}, {}, "pass both rank= and world_size="),
        ({"rank": 2, "world_size": 2}, {}, "need 0 <= rank < world_size, got rank=2"),
        ({"rank": 0, "world_size": 1}, {}, "needs a rendezvous port"),
        ({"rank": 0, "world_size": 1, "master_port": 1, "timeout_s": 0}, {}, "timeout_s must be > 0"),
    ],
)
def test_init_refuses_incomplete_launch_settings(monkeypatch, kwargs, env, message):
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        parallel.init(**kwargs)


def test_init_again_returns_the_same_rank_and_refuses_another(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    try:
        assert parallel.init(0, 1, backend="gloo", master_port=free_port(), timeout_s=10) == (0, 1)
        assert parallel.init() == (0, 1), "a second init() without arguments must return the joined rank"
        with pytest.raises(ValueError, match="already joined as rank 0 of 1, not rank 1 of 2"):
            parallel.init(1, 2)
    finally:
        parallel.destroy()


def test_sharding_without_a_process_group_says_to_call_init():
    with pytest.raises(RuntimeError, match=r"call fluxrt.parallel.init\(\) first"):
        parallel.ParallelFlux(_model(), "ring")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(parallel="zigzag"), ValueError, "parallel must be None or one of ulysses, ring, usp"),
    (dict(ulysses_degree=2), ValueError, "ulysses_degree goes with parallel='usp'"),
    (dict(parallel="ring", cuda_graphs=True), ValueError, "context parallelism runs without CUDA graphs"),
    (dict(parallel="ring"), RuntimeError, r"call fluxrt.parallel.init\(\) first"),
])
def test_compile_refuses_bad_parallel_arguments_and_leaves_the_model_as_it_was(kwargs, error, message):
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(error, match=message):
        fluxrt.compile(model, backend="torch", **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_compile_with_parallel_in_a_one_rank_group(monkeypatch):
    """One rank: the sharded compiled model is the unsharded one; a Ulysses degree that does not fit is refused before
    anything moves; parallel= applies to transformers only."""
    monkeypatch.delenv("RANK", raising=False)
    parallel.init(0, 1, backend="gloo", master_port=free_port(), timeout_s=10)
    try:
        model = _model()
        with pytest.raises(ValueError, match="ulysses_degree 4 must divide the world size 1"):
            fluxrt.compile(model, parallel="usp", ulysses_degree=4, backend="torch")
        assert all(isinstance(m, torch.nn.Linear) for m in (model.img_in, model.double_blocks[0].img_attn.qkv)), \
            "a refused compile must leave the model unconverted"
        with pytest.raises(ValueError, match="parallel= applies to a FLUX transformer"):
            fluxrt.compile(fluxrt.reference.AutoEncoder(TINY_AUTOENCODER), parallel="ring")
        fast = fluxrt.compile(_model(), parallel="ring", backend="torch")
        assert fast.plan["parallel"].startswith("ring over 1 ranks") and fast.plan["cuda_graphs"] == "off"
        inputs = _inputs(TINY, "main")
        with torch.no_grad():
            torch.testing.assert_close(fast(**inputs), _model()(**inputs), rtol=1e-5, atol=1e-6)
    finally:
        parallel.destroy()


@pytest.mark.parametrize("quantize", [None, "fp8-weight"])
def test_a_row_slice_of_the_batched_modulation_computes_those_rows(quantize):
    """What each rank computes of the modulation GEMV (FastFlux._modulation): rows [start, stop) of the whole."""
    from fluxrt.transformer import row_slice

    batched = fluxrt.compile(_model(), quantize=quantize, backend="torch").modulation
    x = torch.randn(2, batched.in_features)
    with torch.no_grad():
        whole = batched(x)
        for start, stop in ((0, 7), (5, 40), (whole.shape[1] - 3, whole.shape[1])):
            torch.testing.assert_close(row_slice(batched, start, stop)(x), whole[:, start:stop], rtol=1e-6, atol=1e-6)


def _diffusers_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY.to_diffusers()).eval()


def _diffusers_inputs() -> dict:
    flux = _inputs(TINY, "main")
    return dict(hidden_states=flux["img"], encoder_hidden_states=flux["txt"], pooled_projections=flux["y"],
                timestep=flux["timesteps"], img_ids=flux["img_ids"][0], txt_ids=flux["txt_ids"][0],
                guidance=flux["guidance"])


def _diffusers_worker(rank: int, world: int, port: int, out_path: str) -> None:
    """A diffusers FluxTransformer2DModel compiled with parallel=: the same diffusers call on every rank."""
    parallel.init(rank, world, backend="gloo", master_port=port, timeout_s=PEER_TIMEOUT_S)
    try:
        fast = fluxrt.compile(_diffusers_model(), parallel="ulysses", backend="torch")
        with torch.no_grad():
            out = fast(**_diffusers_inputs()).sample
        if rank == 0:
            torch.save({"out": out, "plan": fast.fast.plan["parallel"]}, out_path)
    finally:
        parallel.destroy()


def test_a_diffusers_transformer_compiled_with_parallel_gives_the_diffusers_output(tmp_path):
    codes, logs = _run_ranks(2, tmp_path / "out.pt", mode="diffusers")
    assert codes == [0, 0], f"ranks exited with {codes}:\n" + "\n".join(logs)
    with torch.no_grad():
        want = _diffusers_model()(**_diffusers_inputs()).sample
    got = torch.load(tmp_path / "out.pt")
    assert got["plan"] == "ulysses over 2 ranks (ulysses 2 x ring 1), this is rank 0", got["plan"]
    torch.testing.assert_close(got["out"], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


if __name__ == "__main__":
    _mode, _out = sys.argv[1:]
    _rank, _world, _port = (os.environ[name] for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
    if _mode == "diffusers":
        _diffusers_worker(int(_rank), int(_world), int(_port), _out)
    elif _mode.startswith("parity"):
        _worker(int(_rank), int(_world), int(_port), _out, backend="nccl" if _mode == "parity-nccl" else "gloo")
    else:
        _failing_worker(int(_rank), int(_world), int(_port), _out, hang=_mode == "hang")
