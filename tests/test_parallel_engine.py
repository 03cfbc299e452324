"""fluxrt.parallel_engine on gloo: rank 0 runs the pipeline, the other ranks follow its transformer calls.

Each test launches real processes (this file as a script, one per rank) on 127.0.0.1; every launch is bounded and
every process is killed at its deadline. The tiny random pipeline (fluxrt.tiny, fp32 on the CPU) generates at 48 x 64
pixels: 12 image tokens and the tiny T5 length, so the padding to the world size is exercised at 4 ranks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from fluxrt import parallel, parallel_engine
from fluxrt.tiny import tiny_random_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from ranks import run_ranks  # noqa: E402


LAUNCH_TIMEOUT_S = 90
CALL = dict(prompt=["a red cube", "a blue ball"], width=64, height=48, num_steps=2, seed=3, output_type="pt")
# world size -> the (scheme, ulysses_degree, compiled) runs it makes; the tiny model has 2 heads.
RUNS = {
    2: [("ulysses", None, False), ("ring", None, True)],
    4: [("usp", 2, False), ("ring", None, True)],
}


def _pipeline(compiled: bool):
    return tiny_random_pipeline(device="cpu", compile=compiled, backend="torch", progress=False)


def _parity_worker(rank: int, world: int, out: Path) -> None:
    images = {}
    for scheme, degree, compiled in RUNS[world]:
        pipe = _pipeline(compiled)
        with pipe.context_parallel(scheme, degree) as leading:
            if leading:
                images[scheme, compiled] = pipe(**CALL)
                with pytest.raises(RuntimeError, match="do it on every rank before pipe.context_parallel"):
                    pipe.unload_lora()
        assert pipe.transformer is not None and not isinstance(pipe.transformer, parallel_engine.Leader), \
            "leaving the block must give the pipeline its transformer back"
    if rank == 0:
        torch.save(images, out)


def _lora_pipeline(lora: Path):
    pipe = _pipeline(True)
    pipe.enable_lora_hotswap(max_rank=8, max_adapters=2)
    pipe.load_lora(lora, scale=0.8, name="a")
    return pipe


def _lora_worker(rank: int, world: int, out: Path) -> None:
    """Hot-swapped LoRAs loaded on every rank before the group starts; each call's per-image scales travel with it."""
    pipe = _lora_pipeline(out.parent / "a.safetensors")
    with pipe.context_parallel("ring") as leading:
        if leading:
            torch.save(pipe(**CALL, loras=LORA_CHOICES), out)


LORA_CHOICES = [{"a": 1.5}, None]  # per prompt: image 0 at its own scale, image 1 at the loaded 0.8


def _idle_worker(rank: int, world: int, out: Path) -> None:
    """Rank 0 idles 3 x the collective timeout between two calls; keep-alives must hold the followers."""
    pipe = _pipeline(False)
    with pipe.context_parallel("ulysses", keepalive_s=0.5) as leading:
        if leading:
            pipe(**CALL)
            time.sleep(3 * IDLE_TIMEOUT_S)
            with pytest.raises(ValueError):  # a bad call is refused on rank 0 before anything is sent
                pipe.transformer(*_bad_inputs())
            pipe(**CALL)
            out.write_text("ok")


def _bad_inputs() -> tuple:
    img = torch.zeros(1, 12, 64)
    return img, torch.zeros(1, 11, 3), torch.zeros(1, 4, 32), torch.zeros(1, 4, 3), torch.zeros(1), torch.zeros(1, 32)


def _dying_leader_worker(rank: int, world: int, out: Path) -> None:
    pipe = _pipeline(False)
    start = time.monotonic()
    try:
        with pipe.context_parallel("ring") as leading:
            if leading:
                pipe(**CALL)
                os._exit(3)  # rank 0 dies between calls, as a killed process would
    except parallel.ParallelError as error:
        out.write_text(f"{time.monotonic() - start}\n{error}")
        os._exit(4)


IDLE_TIMEOUT_S = 2  # init()'s collective timeout in the idle test
WORKERS = {"parity": (_parity_worker, 30), "lora": (_lora_worker, 30), "idle": (_idle_worker, IDLE_TIMEOUT_S), "leader-dies": (_dying_leader_worker, 30)}


def _run(mode: str, world: int, out: Path) -> tuple[list[int], list[str]]:
    return run_ranks(lambda rank: [__file__, mode, str(out)], world, LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def single_process_images():
    return {compiled: _pipeline(compiled)(**CALL) for compiled in (False, True)}


@pytest.mark.parametrize("world", sorted(RUNS))
def test_rank_0_pipeline_over_every_rank_gives_the_single_process_images(world, tmp_path, single_process_images):
    codes, logs = _run("parity", world, tmp_path / "images.pt")
    assert codes == [0] * world, f"ranks exited with {codes}:\n" + "\n".join(logs)
    images = torch.load(tmp_path / "images.pt")
    assert sorted(images) == sorted((scheme, compiled) for scheme, _, compiled in RUNS[world])
    for (scheme, compiled), image in images.items():
        want = single_process_images[compiled]
        torch.testing.assert_close(image, want, rtol=0, atol=1e-5, msg=lambda m: f"{scheme} compiled={compiled}: {m}")


def test_per_image_lora_scales_reach_every_rank(tmp_path):
    from test_pipeline_lora import write_lora

    lora = write_lora(tmp_path / "a.safetensors", seed=0)
    codes, logs = _run("lora", 2, tmp_path / "images.pt")
    assert codes == [0, 0], f"ranks exited with {codes}:\n" + "\n".join(logs)
    want = _lora_pipeline(Path(lora))(**CALL, loras=LORA_CHOICES)
    assert (want - _pipeline(True)(**CALL)).abs().max() > 0.02, "the LoRA must change the images"
    torch.testing.assert_close(torch.load(tmp_path / "images.pt"), want, rtol=0, atol=1e-5)


def test_keepalives_hold_idle_followers_and_a_bad_call_reaches_no_follower(tmp_path):
    codes, logs = _run("idle", 2, tmp_path / "ok.txt")
    assert codes == [0, 0], f"ranks exited with {codes}:\n" + "\n".join(logs)
    assert (tmp_path / "ok.txt").read_text() == "ok"


def test_a_dead_leader_gives_the_followers_one_clear_error_in_bounded_time(tmp_path):
    codes, logs = _run("leader-dies", 2, tmp_path / "error.txt")
    assert codes == [3, 4], f"want rank 0 to die (3) and rank 1 to catch ParallelError (4), got {codes}:\n{logs}"
    elapsed, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert "waiting for rank 0's next call failed, so a peer rank died or timed out" in message, message
    assert float(elapsed) < 20, f"the follower took {float(elapsed):.0f} s to notice rank 0 died"


def test_only_rank_0_can_lead():
    with pytest.raises(RuntimeError, match="call fluxrt.parallel_engine.follow"):
        parallel_engine.Leader(torch.nn.Linear(1, 1))


if __name__ == "__main__":
    _mode, _out = sys.argv[1], Path(sys.argv[2])
    _worker, _timeout = WORKERS[_mode]
    parallel.init(timeout_s=_timeout)
    try:
        _worker(parallel.dist.get_rank(), parallel.dist.get_world_size(), _out)
    finally:
        parallel.destroy()
