"""fluxrt.parallel on gloo: 2 and 4 CPU processes, the tiny model in fp32, against the single-process model.

Each world size is one launch of real processes (this file run as a script, one per rank) that runs every scheme for
that size and saves rank 0's outputs; the tests compare them with the unsharded model. The text and image lengths
(5 and 15 tokens) divide by neither 2 nor 4, so the padding and its mask are always exercised; with 4 ranks the last
rank's text shard is all padding.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fluxrt
from fluxrt import parallel

TEXT_LEN, GRID_H, GRID_W, BATCH = 5, 3, 5, 2
LAUNCH_TIMEOUT_S = 60
# What each world size runs: name -> (scheme, ulysses_degree). The tiny model has 2 heads.
RUNS = {
    2: {"ulysses": ("ulysses", None), "ring": ("ring", None)},
    4: {"ring": ("ring", None), "usp": ("usp", 2)},
}


def _model_and_inputs():
    torch.manual_seed(0)
    model = fluxrt.reference.Flux(fluxrt.FluxConfig.preset("tiny")).eval()
    p = model.params
    rows, cols = torch.meshgrid(torch.arange(GRID_H), torch.arange(GRID_W), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(1, -1, 3).expand(BATCH, -1, -1)
    inputs = dict(
        img=torch.randn(BATCH, GRID_H * GRID_W, p.in_channels),
        img_ids=img_ids.float(),
        txt=torch.randn(BATCH, TEXT_LEN, p.context_in_dim),
        txt_ids=torch.zeros(BATCH, TEXT_LEN, 3),
        timesteps=torch.rand(BATCH),
        y=torch.randn(BATCH, p.vec_in_dim),
        guidance=torch.full((BATCH,), 3.5),
    )
    return model, inputs


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    parallel.init(rank, world, master_port=port, timeout_s=LAUNCH_TIMEOUT_S)
    try:
        model, inputs = _model_and_inputs()
        outputs = {}
        with torch.no_grad():
            for name, (scheme, ulysses_degree) in RUNS[world].items():
                outputs[name] = parallel.ParallelFlux(model, scheme, ulysses_degree)(**inputs)
        if rank == 0:
            torch.save(outputs, out_path)
    finally:
        parallel.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out_path: Path) -> dict:
    """Run `world` ranks of this file as processes; every one is waited for, and killed at the deadline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    port = _free_port()
    argv = [sys.executable, __file__, str(world), str(port), str(out_path)]
    procs = [
        subprocess.Popen([*argv, str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode != 0]
    assert not failed, f"ranks failed {failed}:\n" + "\n".join(logs)
    return torch.load(out_path)


@pytest.fixture(scope="module", params=sorted(RUNS))
def launched(request, tmp_path_factory):
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"cp{world}") / "out.pt")


@pytest.fixture(scope="module")
def expected():
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        return model(**inputs)


def test_every_scheme_matches_the_single_process_model(launched, expected):
    world, outputs = launched
    assert sorted(outputs) == sorted(RUNS[world]), f"missing runs in {sorted(outputs)}"
    for name, out in outputs.items():
        torch.testing.assert_close(
            out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=lambda m: f"{name}-{world}: {m}"
        )


if __name__ == "__main__":
    _world, _port, _out, _rank = sys.argv[1:]
    _worker(int(_rank), int(_world), int(_port), _out)
