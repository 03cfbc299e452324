"""`fluxrt serve` on N devices, on CPU processes: one context-parallel engine (`torchrun ... fluxrt serve --cp`, gloo,
rank 0 serving HTTP) and N replicas in one process (--replicas). Driven by real clients (the openai package, httpx),
their images compared with a one-process `fluxrt serve --model tiny`'s for the same requests; SIGTERM through
torchrun, a follower killed, and the flag errors.

Every process listens on 127.0.0.1 with --port 0; every launch is bounded and every process it starts is killed at
its deadline (and at the end of its fixture or test).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ranks import free_port  # noqa: E402
from test_serve_engine import wait_until  # noqa: E402
from test_serve_http import WAIT_S, ServerProcess, alone, assert_error, assert_same, decoded, metric  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
REQUESTS = {  # name: the generation body (the tiny model's size, 64x64)
    "star": dict(prompt="a large red star at the center on a white background", size="64x64", steps=8, seed=1),
    "circle": dict(prompt="a small blue circle on a white background", size="64x64", steps=8, seed=2),
    "square": dict(prompt="a green square at the top left", size="64x64", steps=8, seed=3),
    "in flight": dict(prompt="a yellow triangle on a black background", size="64x64", steps=60, seed=4),
}
# Each rank under torchrun runs this instead of `python -m fluxrt`: fluxrt's own main, plus a record of its pid (at
# start) and exit code (at the end), which torchrun does not report for a run it was signalled to stop.
RANK_SCRIPT = """\
import os, sys
from pathlib import Path
from fluxrt.cli import main
record = Path(sys.argv.pop(1))
(record / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
code = main(sys.argv[1:])
(record / f"rank{os.environ['RANK']}.rc").write_text(str(code))
sys.exit(code)
"""


class Launched(ServerProcess):
    """Any command that ends in a `fluxrt serve`, its URL read from the ready line (test_serve_http's reader)."""

    def __init__(self, command: list[str], env: dict, stderr=subprocess.STDOUT):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._ready_url()


def generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json=body, timeout=WAIT_S)


def image_of(response: httpx.Response):
    assert response.status_code == 200, response.text
    return decoded(response.json()["data"][0]["b64_json"])


@pytest.fixture(scope="module")
def one_process_images() -> dict:
    """REQUESTS' images from a one-process `fluxrt serve --model tiny`."""
    server = ServerProcess("--model", "tiny")
    try:
        return {name: image_of(generate(server.url, body)) for name, body in REQUESTS.items()}
    finally:
        server.stop()


# ---- one context-parallel engine under torchrun ----


def _torchrun_server(folder: Path, *flags: str) -> Launched:
    """`torchrun --nproc-per-node 2 ... fluxrt serve --port 0 FLAGS` (through RANK_SCRIPT)."""
    script = folder / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(script), str(folder), "serve", "--port", "0", *flags]
    server = Launched(command, ENV)
    server.folder = folder
    return server


def _stop_all(server: Launched) -> None:
    server.stop()
    for pid in _rank_pids(server.folder):
        _kill(pid)


@pytest.fixture(scope="module")
def cp_server(tmp_path_factory):
    server = _torchrun_server(tmp_path_factory.mktemp("cp"), "--cp", "ulysses", "--model", "tiny")
    yield server
    _stop_all(server)


def _rank_pids(folder: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(folder.glob("rank*.pid"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_cp_server_gives_the_one_process_image_to_the_openai_client(cp_server, one_process_images):
    body = REQUESTS["star"]
    client = openai.OpenAI(base_url=cp_server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
    answer = client.images.generate(model="tiny", prompt=body["prompt"], size=body["size"], n=1,
                                    response_format="b64_json", extra_body={"steps": body["steps"],
                                                                            "seed": body["seed"]})
    assert_same(decoded(answer.data[0].b64_json), one_process_images["star"], "the context-parallel image")
    assert len(_rank_pids(cp_server.folder)) == 2, "two ranks serve"


def test_cp_server_serves_concurrent_requests(cp_server, one_process_images):
    names = ["circle", "square"]
    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda name: generate(cp_server.url, REQUESTS[name]), names))
    for name, response in zip(names, responses):
        assert_same(image_of(response), one_process_images[name], name)


def test_sigterm_to_torchrun_drains_rank_0_and_every_rank_exits_0(cp_server, one_process_images):
    with httpx.Client(base_url=cp_server.url, timeout=WAIT_S) as http, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(generate, cp_server.url, REQUESTS["in flight"])
        wait_until(lambda: metric(http, "fluxrt_jobs_running") == 1, "the request to run")
        cp_server.proc.send_signal(signal.SIGTERM)
        assert_same(image_of(in_flight.result(WAIT_S)), one_process_images["in flight"], "the request in flight")
    cp_server.proc.wait(WAIT_S)
    codes = {path.name: path.read_text() for path in sorted(cp_server.folder.glob("rank*.rc"))}
    assert codes == {"rank0.rc": "0", "rank1.rc": "0"}, f"{codes}; output: {cp_server.output()}"
    output = cp_server.output()
    assert "fluxrt serve: stopped" in output and "rank 1 of 2 stopped (rank 0 closed the group)" in output, output
    left = [pid for pid in _rank_pids(cp_server.folder) if _alive(pid)]
    assert not left, f"ranks {left} are still running"


def test_sigterm_to_rank_0_alone_stops_every_rank_and_torchrun_exits_0(tmp_path):
    server = _torchrun_server(tmp_path, "--cp", "ring", "--model", "tiny")
    try:
        leader_pid = int((tmp_path / "rank0.pid").read_text())
        os.kill(leader_pid, signal.SIGTERM)
        assert server.proc.wait(WAIT_S) == 0, server.output()
        codes = {path.name: path.read_text() for path in sorted(tmp_path.glob("rank*.rc"))}
        assert codes == {"rank0.rc": "0", "rank1.rc": "0"}, f"{codes}; output: {server.output()}"
    finally:
        _stop_all(server)


def test_cp_server_runs_each_requests_hot_swapped_loras_on_every_rank(tmp_path):
    from test_pipeline_lora import write_lora

    from fluxrt.tiny import tiny_random_pipeline

    lora = write_lora(tmp_path / "style.safetensors", seed=0)
    server = _torchrun_server(tmp_path, "--cp", "ulysses", "--model", "tiny-random", "--backend", "torch", "--lora",
                              f"{lora}:0.5")
    choices = {"loaded scale": {}, "style at 1.5": {"loras": {"style": 1.5}}, "none": {"loras": {}}}
    try:
        images = {case: image_of(generate(server.url, dict(prompt="a red star", size="32x32", steps=2, seed=4,
                                                            **extra))) for case, extra in choices.items()}
    finally:
        _stop_all(server)
    pipe = tiny_random_pipeline(compile=True, backend="torch", progress=False)
    pipe.enable_lora_hotswap()
    pipe.load_lora(lora, scale=0.5)
    for case, extra in choices.items():
        assert_same(images[case], alone(pipe, prompt="a red star", width=32, height=32, num_steps=2, seed=4, **extra),
                    case)
    assert np.abs(images["style at 1.5"] - images["none"]).max() > 0, "the LoRA changed nothing: not applied?"


# ---- a follower dies: launched by hand, so that torchrun's agent does not tear the group down itself ----


def test_a_dead_follower_fails_the_next_request_and_leaves_the_server_unhealthy(tmp_path):
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    command = [sys.executable, "-m", "fluxrt", "serve", "--cp", "ring", "--port", "0", "--model", "tiny"]
    follower = subprocess.Popen(command, env=dict(env, RANK="1", LOCAL_RANK="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    leader = None
    try:
        leader = Launched(command, dict(env, RANK="0", LOCAL_RANK="0"))
        with httpx.Client(base_url=leader.url, timeout=WAIT_S) as http:
            assert http.get("/ready").status_code == 200
            follower.send_signal(signal.SIGKILL)
            follower.wait(WAIT_S)
            failed = http.post("/v1/images/generations", json=REQUESTS["star"])
            assert failed.status_code in (500, 503), failed.text
            assert "context-parallel group failed" in failed.json()["error"]["message"], failed.text
            assert_error(http.get("/ready"), 503, "context-parallel group failed")
            assert assert_error(http.get("/health"), 503, "context-parallel group failed")["code"] == "engine_failed"
            assert metric(http, "fluxrt_replica_up", replica="0") == 0, "the metrics say the group is up"
            refused = http.post("/v1/images/generations", json=REQUESTS["circle"])
            assert assert_error(refused, 503, "context-parallel group failed")["code"] == "engine_failed"
        leader.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = leader.proc.wait(WAIT_S)
        assert time.monotonic() - started < 20, "rank 0 took too long to stop"
    finally:
        for proc in (follower, leader.proc if leader else None):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [line for line in leader.output().splitlines() if line.startswith("fluxrt: error")]
    assert code == 2 and len(errors) == 1 and "context-parallel group failed" in errors[0], leader.output()


def test_followers_ignore_sigterm_and_sigint_and_end_when_rank_0_dies():
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    command = [sys.executable, "-m", "fluxrt", "serve", "--cp", "ulysses", "--port", "0", "--model", "tiny"]
    follower = subprocess.Popen(command, env=dict(env, RANK="1", LOCAL_RANK="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    leader = None
    try:
        leader = Launched(command, dict(env, RANK="0", LOCAL_RANK="0"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            follower.send_signal(sig)
        assert image_of(generate(leader.url, REQUESTS["star"])) is not None, "the follower stopped following"
        assert follower.poll() is None, "a follower ended on a signal while rank 0 still served"
        leader.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = follower.wait(WAIT_S)
        elapsed = time.monotonic() - killed
    finally:
        for proc in (follower, leader.proc if leader else None):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [line for line in follower.stderr.read().splitlines() if line.startswith("fluxrt: error")]
    assert code == 2 and len(errors) == 1 and "waiting for rank 0's next call failed" in errors[0], errors
    assert elapsed < 20, f"the follower took {elapsed:.0f} s to give up on its dead rank 0"


# ---- replicas in one process ----


def test_replicas_serve_concurrent_requests_with_the_one_process_images(one_process_images):
    server = ServerProcess("--model", "tiny", "--replicas", "2", "--warmup", "64x64")
    try:
        names = ["circle", "square"]
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as http, ThreadPoolExecutor(3) as pool:
            warmed = [metric(http, "fluxrt_replica_jobs_total", replica=i) for i in range(2)]
            assert warmed == [1, 1], f"--warmup did not run once on each replica: {warmed}"
            long = pool.submit(generate, server.url, REQUESTS["in flight"])
            wait_until(lambda: metric(http, "fluxrt_jobs_running") == 1, "the first request to run")
            # one replica is busy: the next request goes to the idle one (the engine's admission rule)
            short = list(pool.map(lambda name: generate(server.url, REQUESTS[name]), names))
            for name, response in zip(names + ["in flight"], short + [long.result(WAIT_S)]):
                assert_same(image_of(response), one_process_images[name], f"{name} on replicas")
            per_replica = [metric(http, "fluxrt_replica_jobs_total", replica=i) - 1 for i in range(2)]
        assert sum(per_replica) == 3 and min(per_replica) >= 1, f"jobs per replica: {per_replica}"
    finally:
        server.stop()


# ---- flags ----


@pytest.fixture
def loads_nothing(monkeypatch):
    """main(["serve", ...]) in process must fail before it joins a group, loads a model or serves."""
    import fluxrt.cli
    from fluxrt import parallel

    def refuse(*args, **kwargs):
        raise AssertionError("got past the flag checks: the bad flags were not refused")

    for module, name in ((fluxrt.cli, "_serve_pipeline"), (fluxrt.cli, "_run_uvicorn"), (parallel, "init")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("flags, torchrun, words", [
    (["--cp", "ulysses"], False, "launch with `torchrun --nproc-per-node N -m fluxrt serve ... --cp ...`"),
    (["--ulysses-degree", "2"], False, "--ulysses-degree goes with --cp usp"),
    (["--cp", "ring", "--ulysses-degree", "2"], True, "--ulysses-degree goes with --cp usp (--cp ring sets it)"),
    (["--cp", "ulysses", "--replicas", "2"], True, "--cp and --replicas are two ways to use N GPUs, pick one"),
    (["--replicas", "0"], False, "--replicas must be a positive number of pipelines, got 0"),
])
def test_bad_scaling_flags_are_one_line_before_anything_loads(capsys, monkeypatch, loads_nothing, flags, torchrun,
                                                               words):
    from fluxrt.cli import main

    if torchrun:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxrt: error: ") and words in err and err.count("\n") == 1, err


def test_replicas_go_one_per_gpu(monkeypatch):
    from fluxrt.serve.models import replica_devices

    cpu = torch.device("cpu")
    assert replica_devices(cpu, 3) == [cpu] * 3, "a CPU holds every replica"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert replica_devices(torch.device("cuda"), 3) == [torch.device("cuda", i) for i in range(3)]
    assert replica_devices(torch.device("cuda", 2), 1) == [torch.device("cuda", 2)], "one replica: the given GPU"
    with pytest.raises(ValueError, match="--replicas 5 needs 5 GPUs .* this machine has 4"):
        replica_devices(torch.device("cuda"), 5)
    with pytest.raises(ValueError, match="pass --device cuda, not cuda:1"):
        replica_devices(torch.device("cuda", 1), 2)
