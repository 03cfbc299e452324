"""`torchrun -m fluxrt generate --cp ...` on CPU processes (gloo, 127.0.0.1): the image one process makes, written by
rank 0 alone; a rank that dies mid-run ends every other rank with one clear error in bounded time and no file.

Every launch is bounded; every process it starts is killed at its deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ranks import free_port, rank_env  # noqa: E402

TIMEOUT_S = 120
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")


def _run(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=TIMEOUT_S)


def _torchrun(world: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "fluxrt", "generate", "--no-progress", *flags]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


@pytest.fixture(scope="module")
def one_process_image(tmp_path_factory) -> np.ndarray:
    folder = tmp_path_factory.mktemp("one")
    done = _run([sys.executable, "-m", "fluxrt", "generate", "--no-progress", "--steps", "6", "--out", "one.png"],
                folder)
    assert done.returncode == 0, done.stderr
    return _pixels(folder / "one.png")


@pytest.mark.parametrize("world, flags", [(2, ["--cp", "ring"]), (4, ["--cp", "usp", "--ulysses-degree", "2"])],
                         ids=["ring-2", "usp-2x2"])
def test_torchrun_gives_the_one_process_image_written_by_rank_0_alone(world, flags, tmp_path, one_process_image):
    done = _run(_torchrun(world, "--steps", "6", "--out", "cp.png", *flags), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp.png"], "only rank 0 writes, and nothing else is left"
    assert done.stdout.count("wrote cp.png") == 1, done.stdout
    difference = np.abs(_pixels(tmp_path / "cp.png") - one_process_image).max()
    assert difference <= 1, f"the context-parallel image differs from one process's by {difference} levels"


def _launch_ranks(world: int, folder: Path, *flags: str) -> list[subprocess.Popen]:
    """The ranks as torchrun would start them, without torchrun's agent (which would tear the others down itself):
    what is tested is fluxrt's own reaction to a dead peer."""
    argv = [sys.executable, "-m", "fluxrt", "generate", *flags]
    return [subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE,
                             stderr=open(folder.parent / f"rank{rank}.err", "w"), text=True)
            for rank, env in enumerate(rank_env(world))]


def test_a_rank_killed_mid_run_ends_rank_0_with_one_clear_error_and_no_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    procs = _launch_ranks(2, folder, "--steps", "400", "--out", "cp.png", "--cp", "ulysses")
    try:
        progress = tmp_path / "rank0.err"
        deadline = time.monotonic() + TIMEOUT_S / 2
        while "/400" not in progress.read_text() and time.monotonic() < deadline:  # rank 0's bar: steps under way
            assert procs[0].poll() is None, f"rank 0 ended before the kill: {progress.read_text()}"
            time.sleep(0.05)
        assert "/400" in progress.read_text(), "rank 0 never started stepping"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        procs[0].wait(timeout=TIMEOUT_S / 2)
        elapsed = time.monotonic() - killed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    errors = [line for line in progress.read_text().replace("\r", "\n").splitlines() if line.startswith("fluxrt: error")]
    assert procs[0].returncode == 2, f"rank 0 exited {procs[0].returncode}: {errors}"
    assert len(errors) == 1 and "a peer rank died or timed out" in errors[0], errors
    assert elapsed < 20, f"rank 0 took {elapsed:.0f} s to give up on its dead peer"
    assert list(folder.iterdir()) == [], "no partial or temporary file may be left"


@pytest.mark.parametrize("flags, env, message", [
    (["--cp", "ring"], {}, "launch with `torchrun --nproc-per-node N -m fluxrt generate"),
    (["--ulysses-degree", "2"], {}, "--ulysses-degree goes with --cp usp"),
    (["--cp", "ring", "--ulysses-degree", "2"], {"RANK": "0", "WORLD_SIZE": "2"}, "--cp ring sets it"),
    (["--cp", "ulysses", "--compare-reference"], {"RANK": "0", "WORLD_SIZE": "2"}, "runs on one device"),
])
def test_bad_context_parallel_flags_are_refused_before_anything_runs(flags, env, message, tmp_path):
    clean = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE")}
    done = _run([sys.executable, "-m", "fluxrt", "generate", "--out", "x.png", *flags], tmp_path, dict(clean, **env))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
