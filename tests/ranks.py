"""Launching test processes as the ranks of a torch.distributed group on loopback, with bounded waits.

Every process started here is waited for and killed at its deadline, whatever happens in the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

# What every rank gets: one thread (two cores shared by all ranks), gloo on the loopback interface.
RANK_ENV = dict(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(world: int, **extra: str) -> list[dict]:
    """The environment of each of `world` ranks as torchrun sets it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*)."""
    env = dict(os.environ, **RANK_ENV, MASTER_PORT=str(free_port()), WORLD_SIZE=str(world), **extra)
    return [dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(world)]


def run_ranks(argv_of_rank, world: int, timeout_s: float, **extra_env: str) -> tuple[list[int], list[str]]:
    """Run `world` processes (argv_of_rank(rank) -> argv; python is prepended) to the end; their exit codes and
    combined outputs. Killed at timeout_s."""
    procs = [subprocess.Popen([sys.executable, *argv_of_rank(rank)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank, env in enumerate(rank_env(world, **extra_env))]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout_s)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs], logs
