"""fluxrt.serve.ray: `python -m fluxrt.serve.ray` on a local Ray instance, 2 CPU replicas of tiny-random (64x64).

One Ray instance for the module (2 CPUs, no dashboard, its own temp dir, shut down whatever happens); the command
runs as a subprocess connected to it, as on a cluster. The tests: both replicas answer with the same model; a
replica killed with requests in flight fails them cleanly (HTTP 500 at once, the OpenAI client's retry lands on a
live replica), never hangs, and is replaced; SIGTERM removes the app and exits 0. The argument checks run without
Ray, and one replica class without Ray Serve.
"""

import asyncio
import base64
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import ray  # the extra fluxrt[ray], which `make setup` installs: missing, this file fails rather than skips
from PIL import Image
from ray import serve

from fluxrt.serve import ray as flux_ray
from fluxrt.serving import GenerationRequest

API_KEY = "test-key"
SIZE = "64x64"
READY_TIMEOUT_S = 90  # two replicas importing torch and building tiny-random on 2 busy cores
REQUEST_TIMEOUT_S = 30  # the bound within which every request must end, answered or failed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs; its address. (Ray's own ports follow the node's address, not loopback; its
    token authentication, on by default, guards them.)"""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        context = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                           configure_logging=False)
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's sockets and logs; the test's verdict does not need them


@pytest.fixture(scope="module")
def server(cluster):
    """`python -m fluxrt.serve.ray` with 2 CPU replicas on the cluster: (process, base URL) once it is serving."""
    port = _free_port()
    command = [sys.executable, "-m", "fluxrt.serve.ray", "--address", cluster, "--host", "127.0.0.1", "--port",
               str(port), "--model", "tiny-random", "--replicas", "2", "--gpus-per-replica", "0", "--cpus-per-replica",
               "0.5", "--max-batch", "2", "--size", SIZE, "--api-key", API_KEY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_line(process, "fluxrt serving", READY_TIMEOUT_S)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for_line(process, text: str, timeout_s: float) -> None:
    found = threading.Event()

    def read():
        for line in process.stdout:
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout_s):
        process.kill()
        pytest.fail(f"no {text!r} line within {timeout_s} s; stderr:\n{process.stderr.read()[-3000:]}")


def _client(url: str, max_retries: int, on_response=None) -> openai.OpenAI:
    hooks = {"response": [on_response]} if on_response else {}
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=max_retries,
                         http_client=httpx.Client(timeout=REQUEST_TIMEOUT_S, event_hooks=hooks))


def _generate(client: openai.OpenAI, seed: int, steps: int = 2) -> tuple[str, np.ndarray]:
    """(the replica that answered, the image as uint8 pixels)."""
    raw = client.images.with_raw_response.generate(prompt="a red star", size=SIZE, response_format="b64_json",
                                                   extra_body={"steps": steps, "seed": seed})
    image = Image.open(io.BytesIO(base64.b64decode(raw.parse().data[0].b64_json)))
    return raw.headers[flux_ray.REPLICA_HEADER], np.asarray(image.convert("RGB"))


def _replicas() -> set[str]:
    """The live replicas' actor names (what their responses' replica header says)."""
    return {name["name"] for name in ray.util.list_named_actors(all_namespaces=True)
            if name["name"].startswith("SERVE_REPLICA::fluxrt#FluxReplica#")}


# ---- with Ray ----


def test_both_replicas_answer_with_the_same_model(server):
    _, url = server
    client = _client(url, max_retries=0)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda seed: _generate(client, seed % 2), range(8)))
    replicas = {replica for replica, _ in answers}
    assert len(replicas) == 2, f"8 concurrent requests were served by {replicas}, not by both replicas"
    assert replicas == _replicas(), f"the responses name {replicas}; the replica actors are {_replicas()}"
    for seed in (0, 1):  # every replica built the same model: a seed draws the same image wherever it runs
        images = [image for k, (_, image) in enumerate(answers) if k % 2 == seed]
        assert images[0].shape == (64, 64, 3)
        for image in images[1:]:
            difference = np.abs(image.astype(int) - images[0]).max()
            assert difference <= 1, f"seed {seed}: images differ by {difference} levels between requests"


def test_api_key_reaches_the_replicas(server):
    _, url = server
    response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red star", "size": SIZE},
                          timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_killed_replica_fails_its_requests_cleanly_and_is_replaced(server):
    _, url = server
    before = _replicas()
    assert len(before) == 2, before
    victim = sorted(before)[0]

    def request(seed):
        """(the replica that answered, or the clean HTTP error's status; every attempt's status; seconds)."""
        attempts = []
        client = _client(url, max_retries=2, on_response=lambda response: attempts.append(response.status_code))
        start = time.monotonic()
        try:
            outcome = _generate(client, seed, steps=60)[0]
        except openai.APIStatusError as err:  # a clean HTTP error: fine, as long as it came in time
            outcome = err.status_code
        return outcome, attempts, time.monotonic() - start

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(request, seed) for seed in range(8)]
        time.sleep(1.0)  # 8 requests of 60 steps (about a second each alone): each replica is mid-batch now
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        # openai.APITimeoutError / APIConnectionError (no HTTP answer after the retries) would raise here
        outcomes = [future.result(timeout=3 * REQUEST_TIMEOUT_S) for future in futures]
    for outcome, attempts, seconds in outcomes:
        assert seconds < 2 * REQUEST_TIMEOUT_S, f"a request took {seconds:.0f} s: {outcomes}"
        assert outcome != victim, f"a request was answered by the killed replica {victim}: {outcomes}"
        assert isinstance(outcome, str) or outcome >= 500, f"not a clean server error: {outcomes}"
    retried = [o for o in outcomes if 500 in o[1] and isinstance(o[0], str)]
    assert retried, f"no request in flight on the killed replica was retried onto a live one: {outcomes}"

    deadline = time.monotonic() + 45
    while (len(_replicas() - before) < 1 or victim in _replicas()) and time.monotonic() < deadline:
        time.sleep(0.25)
    replacement = _replicas() - before
    assert len(replacement) == 1 and victim not in _replicas(), f"not replaced: {before} -> {_replicas()}"
    answered_by = set()
    probe = _client(url, max_retries=0)
    while time.monotonic() < deadline and not answered_by & replacement:  # it answers once it is ready
        with ThreadPoolExecutor(4) as pool:
            answered_by |= {replica for replica, _ in pool.map(lambda seed: _generate(probe, seed), range(4))}
    assert answered_by & replacement, f"the replacement {replacement} never answered (only {answered_by})"


def test_sigterm_answers_requests_in_flight_removes_the_app_and_exits_0(server):
    process, url = server
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(_generate, _client(url, max_retries=0), seed, 40) for seed in range(2)]
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert all(isinstance(future.result()[0], str) for future in in_flight), "requests in flight were dropped"
    assert process.wait(timeout=60) == 0, process.stderr.read()[-3000:]
    assert flux_ray.APP_NAME not in serve.status().applications


# ---- without Ray ----


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_replicas=0), "num_replicas must be a positive int"),
    (dict(num_replicas=2, autoscaling_config={"max_replicas": 4}), "not both"),
    (dict(autoscaling_config=[1, 4]), "autoscaling_config must be a dict"),  # a TypeError
    (dict(num_gpus_per_replica=-1), "num_gpus_per_replica must be a number >= 0"),
    (dict(num_cpus_per_replica="1"), "num_cpus_per_replica must be a number >= 0"),
    (dict(max_batch=0), "max_batch must be between 1 and 64"),
    (dict(max_batch=65), "max_batch must be between 1 and 64"),
    (dict(max_batch=2.0), "max_batch must be an int"),  # a TypeError
    (dict(max_queue=True), "max_queue must be a positive int"),
    (dict(batching="dynamic"), "batching must be one of"),
    (dict(timeout_s=0), "timeout_s must be a positive number"),
    (dict(default_size=(64, 60)), "default_size height must be a multiple of 16"),
    (dict(default_size="64x64"), "default_size must be (width, height)"),
    (dict(api_key=""), "api_key must be a non-empty string"),
    (dict(warmup="64x64"), "warmup must be a list of (width, height) sizes"),
    (dict(warmup=[(64, 64), (64, 8192)]), "warmup size height must be a multiple of 16 between 16 and 4096"),
])
def test_deployment_refuses_bad_arguments(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        flux_ray.deployment("tiny-random", **kwargs)


def test_deployment_passes_backend_and_loras_to_its_replicas(tmp_path):
    """--lora / --backend as `fluxrt serve`'s: each replica's load_pipeline gets them (checked up front)."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")  # only its existence is checked here; the replica loads it (tests/test_serve_models.py)
    app = flux_ray.deployment("tiny-random", backend="torch", loras=[f"{lora}:0.5", (lora, 2.0)])
    assert app._bound_deployment.init_args[-1] == {"backend": "torch", "loras": ((lora, 0.5), (lora, 2.0))}
    with pytest.raises(ValueError, match="does not exist"):
        flux_ray.deployment("tiny-random", loras=[str(tmp_path / "missing.safetensors")])
    with pytest.raises(ValueError, match="backend must be"):
        flux_ray.deployment("tiny-random", backend="cuda")


def test_deployment_places_replicas_on_gpus_or_cpus():
    on_gpus = flux_ray.deployment("/models/flux1-dev", num_replicas=3, max_batch=2, max_queue=6)
    deployed = on_gpus._bound_deployment
    assert deployed.num_replicas == 3
    assert deployed.ray_actor_options["num_gpus"] == 1
    assert deployed.max_ongoing_requests == 8, "a replica should take what its engine holds: batch + queue"
    model, device, engine_options, api_key, model_name, _, warmup, _, pipeline = on_gpus._bound_deployment.init_args
    assert (model, device, model_name, api_key, warmup) == ("/models/flux1-dev", "cuda", "flux1-dev", None, ())
    assert pipeline == {"backend": "auto", "loras": ()}
    assert engine_options["max_batch"] == 2 and engine_options["max_queue"] == 6
    on_cpus = flux_ray.deployment("tiny-random", num_gpus_per_replica=0, autoscaling_config={"max_replicas": 4},
                                  warmup=[[64, 32]])
    assert on_cpus._bound_deployment.init_args[6] == ((64, 32),)
    assert on_cpus._bound_deployment.init_args[1] == "cpu"
    assert on_cpus._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "num_replicas must be a positive int"),
    (["--replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be at least --replicas (3)"),
    (["--size", "64"], "expected WIDTHxHEIGHT"),
    (["--warmup", "64x64,64"], "expected WIDTHxHEIGHT"),
    (["--warmup", "64x64,64x8"], "warmup size height must be a multiple of 16"),
])
def test_command_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flux_ray.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_takes_the_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUXRT_API_KEY", "from-env")
    assert flux_ray._parser().parse_args([]).api_key == "from-env"
    monkeypatch.delenv("FLUXRT_API_KEY")
    assert flux_ray._parser().parse_args([]).api_key is None


def test_command_without_a_cluster_says_how_to_start_one(capsys, monkeypatch):
    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(flux_ray.ray, "init", no_cluster)
    assert flux_ray.main(["--address", "auto"]) == 2
    assert "no Ray cluster at --address auto" in capsys.readouterr().err


def test_command_reports_a_replica_that_does_not_start(capsys, monkeypatch):
    deleted = []

    def failed_run(app, **kwargs):
        raise RuntimeError("Deploying application fluxrt failed: Failed to update the deployments ['FluxReplica'].")

    status = SimpleNamespace(applications={flux_ray.APP_NAME: SimpleNamespace(deployments={
        "FluxReplica": SimpleNamespace(message="RuntimeError: Traceback (most recent call last):\n  File ...\n"
                                               "FileNotFoundError: /models/missing does not exist\n")})})
    monkeypatch.setattr(flux_ray.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(flux_ray.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(flux_ray.serve, "run", failed_run)
    monkeypatch.setattr(flux_ray.serve, "status", lambda: status)
    monkeypatch.setattr(flux_ray.serve, "delete", deleted.append)
    assert flux_ray.main(["--model", "/models/missing"]) == 1
    err = capsys.readouterr().err
    assert "FileNotFoundError: /models/missing does not exist" in err and "Traceback" not in err, err
    assert deleted == [flux_ray.APP_NAME], "the failed app should not stay deployed"


def test_command_autoscales_and_ctrl_c_removes_the_app_and_exits_130(monkeypatch):
    deployed, deleted = [], []

    def run(app, **kwargs):
        deployed.append(app)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C once it serves

    monkeypatch.setattr(flux_ray.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(flux_ray.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(flux_ray.serve, "run", run)
    monkeypatch.setattr(flux_ray.serve, "delete", deleted.append)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert flux_ray.main(["--replicas", "2", "--max-replicas", "5", "--max-batch", "3"]) == 130
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert deleted == [flux_ray.APP_NAME]
    scaling = deployed[0]._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 5, 3)


def test_replica_warms_up_checks_health_and_drains():
    replica = flux_ray.FluxReplica("tiny-random", "cpu", dict(max_batch=2, max_queue=4, batching="step",
                                                             timeout_s=60), None, "tiny-random", (64, 64),
                                   warmup=((32, 32), (64, 48)), replica_id="replica-under-test")
    assert 'fluxrt_jobs_total{outcome="completed"} 2' in replica.engine.metrics(), "one warm-up image per size"
    replica.check_health()
    job = replica.engine.submit(GenerationRequest("a red star", width=64, height=64, num_steps=2, seed=0))
    asyncio.run(replica.drain())
    assert job.future.done() and job.future.result().ok, "drain should finish the accepted job"
    with pytest.raises(RuntimeError, match="replica-under-test: the engine's worker thread is not running"):
        replica.check_health()
