"""Scale-out on Ray Serve: replicas of the `fluxrt serve` engine and HTTP API behind Ray's proxy, router and autoscaler.

    from ray import serve
    from fluxrt.serve.ray import deployment
    serve.run(deployment("/models/flux1-dev", num_replicas=4), route_prefix="/")   # one replica per GPU

    python -m fluxrt.serve.ray --model /models/flux1-dev --replicas 4       # on a running cluster (`ray start`)

Each replica is a Ray actor holding one GPU (num_gpus_per_replica; 0 runs on its CPUs) and builds, in the actor, its
own pipeline, Engine (fluxrt.serve.engine: bounded queue, batching, timeouts) and FastAPI app (fluxrt.serve.app), so
the HTTP API is exactly `fluxrt serve`'s. Ray adds what is outside one engine: its HTTP proxy (on every node) routes
each request to a replica with room, the controller replaces a replica that dies or fails its health check (the
engine's worker thread is dead), and autoscaling_config lets Ray add and remove replicas with the load.

A replica answers at most max_queue + max_batch requests at once (Ray's max_ongoing_requests): past that Ray queues
them in the proxy, and a full engine queue still answers 429 with Retry-After. When a replica dies, its requests in
flight get HTTP 500 from Ray's proxy at once (OpenAI clients retry those: the retry goes to a live replica); requests
not yet routed go to the others. Every response names the replica that served it (header x-fluxrt-replica, the
replica's Ray actor name), and /metrics is that replica's engine's. The model path must exist on every node.

Ray is imported here only: `import fluxrt` and `fluxrt serve` work without it (it is the extra fluxrt[ray]).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import signal
import sys
import threading

try:
    import ray
    from ray import serve
except ImportError as err:  # the optional extra is missing: say how to get it
    raise ImportError("fluxrt.serve.ray needs Ray Serve: pip install 'fluxrt[ray]' (or 'ray[serve]')") from err
# each replica builds its app after its engine (serve.ingress() with no app, then __serve_build_asgi_app__): a recent
# Ray Serve feature (tested with 2.60); older ones require the app when the class is defined
if inspect.signature(serve.ingress).parameters["app"].default is not None:
    raise ImportError(f"fluxrt.serve.ray needs a Ray Serve whose serve.ingress() takes no app (tested with 2.60); "
                      f"this is ray {ray.__version__}: pip install -U 'ray[serve]'")

from ..validation import check_batch_size, check_size
from .batching import KINDS as BATCHING_KINDS
from .models import load_pipeline, parse_lora_spec, served_model_name

APP_NAME = "fluxrt"
REPLICA_HEADER = "x-fluxrt-replica"
DEFAULT_ENGINE_TIMEOUT_S = 600.0
CONSTRUCTOR_TRIES = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT


class FluxReplica:
    """One replica: its own pipeline (on its GPU when Ray gave it one), Engine and `fluxrt serve` app.

    warmup: (width, height) sizes generated once before the replica reports ready. replica_id: the name its
    responses carry (None: this Ray Serve replica's actor name)."""

    def __init__(self, model: str, device: str, engine_options: dict, api_key: str | None, model_name: str,
                 default_size: tuple[int, int] | None = None, warmup: tuple = (), replica_id: str | None = None,
                 pipeline_options: dict | None = None):
        from ..serving import GenerationRequest
        from .app import create_app
        from .engine import Engine

        self.replica_id = replica_id or serve.get_replica_context().replica_id.to_full_id_str()
        pipe = load_pipeline(model, device, **(pipeline_options or {}))  # backend, loras: as `fluxrt serve`'s
        self.engine = Engine(pipe, **engine_options).start()
        for width, height in warmup:  # as `fluxrt serve --warmup`: compile and caches before the first request
            request = GenerationRequest("warm-up", width=width, height=height, num_steps=2, seed=0)
            self.engine.submit(request).future.result()
        sized = {} if default_size is None else {"default_size": default_size}
        self.http_app = create_app(self.engine, model_name, api_key, **sized)
        self.http_app.add_middleware(_ReplicaHeader, replica_id=self.replica_id)

    def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ingress: the app exists only once the replica has built its engine."""
        return self.http_app

    def check_health(self) -> None:
        """Ray Serve's health check (every few seconds): a replica whose engine worker died is replaced."""
        if not self.engine.running:
            raise RuntimeError(f"replica {self.replica_id}: the engine's worker thread is not running")

    async def drain(self) -> None:
        """Finish the jobs the engine accepted, then stop it (off the event loop: the worker may need seconds)."""
        await asyncio.to_thread(self.engine.shutdown, True, self.engine.timeout_s)


class _ReplicaHeader:
    """ASGI middleware (plain, as the app's own: BaseHTTPMiddleware would hide client disconnects): every response
    says which replica served it."""

    def __init__(self, app, replica_id: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_tagged)


def deployment(model: str = "tiny-random", *, num_replicas: int | None = None, num_gpus_per_replica: float = 1,
               num_cpus_per_replica: float = 1, max_batch: int = 4, max_queue: int = 64, batching: str = "step",
               timeout_s: float | None = DEFAULT_ENGINE_TIMEOUT_S, api_key: str | None = None,
               model_name: str | None = None, default_size: tuple[int, int] | None = None, warmup=(),
               autoscaling_config: dict | None = None, backend: str = "auto", loras=()) -> serve.Application:
    """The bound Ray Serve application (for serve.run) of `model` on replicas of the `fluxrt serve` engine.

    num_replicas: fixed replica count (default 1), or autoscaling_config (Ray's: min_replicas, max_replicas,
    target_ongoing_requests, ...), not both. num_gpus_per_replica: 1 = one replica per GPU; 0 = CPU replicas.
    max_batch, max_queue, batching, timeout_s: each replica's Engine's. api_key, model_name (default:
    served_model_name(model)), default_size ((width, height) of a request without size; default the app's):
    create_app's. warmup: (width, height) sizes each replica generates once before it takes requests.
    backend: fluxrt.compile's. loras: "PATH[:SCALE]" strings or (path, scale) pairs every replica loads hot-swapped,
    named by file stem, as `fluxrt serve --lora` (the files at the same path on every node).
    Bad arguments raise ValueError / TypeError here, before anything is deployed."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a path or a tiny-random name (a non-empty str), got {model!r}")
    engine_options = _engine_options(max_batch, max_queue, batching, timeout_s)
    scaling = _scaling(num_replicas, autoscaling_config)
    gpus = _resources(num_gpus_per_replica, "num_gpus_per_replica")
    cpus = _resources(num_cpus_per_replica, "num_cpus_per_replica")
    if default_size is not None:
        default_size = _size_pair(default_size, "default_size")
    if isinstance(warmup, (str, bytes)) or not hasattr(warmup, "__iter__"):
        raise ValueError(f"warmup must be a list of (width, height) sizes, got {warmup!r}")
    warmup = tuple(_size_pair(size, "warmup size") for size in warmup)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string (or None: no authentication)")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    loras = tuple(parse_lora_spec(item if isinstance(item, str) else f"{item[0]}:{item[1]}") for item in loras)

    replica_class = serve.ingress()(_ServedReplica)
    served = serve.deployment(
        replica_class, name="FluxReplica", **scaling, ray_actor_options={"num_gpus": gpus, "num_cpus": cpus},
        # a replica takes what its engine can hold (running batch + queue), so its own 429 is the backpressure
        max_ongoing_requests=max_batch + max_queue,
        # scaling down or redeploying: in-flight images get up to the engine's own timeout to finish
        graceful_shutdown_timeout_s=timeout_s or DEFAULT_ENGINE_TIMEOUT_S,
        # a model that does not load fails the same way each time: report it after a few tries, not Ray's 20
        max_constructor_retry_count=CONSTRUCTOR_TRIES)
    return served.bind(model, "cuda" if gpus > 0 else "cpu", engine_options, api_key,
                       model_name or served_model_name(model), default_size, warmup, None,
                       {"backend": backend, "loras": loras})


class _ServedReplica(FluxReplica):
    async def __del__(self):
        """Ray Serve calls this when it stops the replica (after its in-flight requests, up to the grace period)."""
        await self.drain()


def _engine_options(max_batch, max_queue, batching, timeout_s) -> dict:
    """The Engine's own rules, checked before anything is deployed (a replica refusing them fails only at start)."""
    check_batch_size(max_batch, "max_batch")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
    if batching not in BATCHING_KINDS:
        raise ValueError(f"batching must be one of {BATCHING_KINDS}, got {batching!r}")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    return dict(max_batch=max_batch, max_queue=max_queue, batching=batching, timeout_s=timeout_s)


def _scaling(num_replicas, autoscaling_config) -> dict:
    if autoscaling_config is not None:
        if num_replicas is not None:
            raise ValueError("give num_replicas (a fixed count) or autoscaling_config (min_replicas, max_replicas, "
                             "...), not both")
        if not isinstance(autoscaling_config, dict):
            raise TypeError(f"autoscaling_config must be a dict of Ray Serve's AutoscalingConfig fields, got "
                            f"{type(autoscaling_config).__name__}")
        return {"autoscaling_config": autoscaling_config}
    replicas = 1 if num_replicas is None else num_replicas
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    return {"num_replicas": replicas}


def _size_pair(size, what: str) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{what} must be (width, height), got {size!r}")
    return check_size(*size, names=(f"{what} width", f"{what} height"))


def _resources(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{what} must be a number >= 0 (Ray resources; fractions share a device), got {value!r}")
    return value


# ---- python -m fluxrt.serve.ray ----


def main(argv: list[str] | None = None) -> int:
    """Deploy on a running Ray cluster and serve until SIGTERM (exit 0) or Ctrl-C (exit 130); then remove the app:
    its replicas finish the requests in flight first."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        app = deployment(args.model, num_replicas=None if args.max_replicas else args.replicas,
                         num_gpus_per_replica=args.gpus_per_replica, num_cpus_per_replica=args.cpus_per_replica,
                         max_batch=args.max_batch, max_queue=args.max_queue, batching=args.batching,
                         timeout_s=args.timeout or None, api_key=args.api_key, default_size=args.size,
                         warmup=args.warmup, autoscaling_config=_autoscaling(args, parser), backend=args.backend,
                         loras=args.lora or ())
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    try:
        ray.init(address=args.address, log_to_driver=False)
    except ConnectionError as err:
        print(f"python -m fluxrt.serve.ray: no Ray cluster at --address {args.address} ({err}); start one with "
              "`ray start --head` (other nodes: `ray start --address=HEAD_IP:6379`)", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as err:  # a replica failed to start (a bad model path on a node, out of memory, ...)
        print(f"python -m fluxrt.serve.ray: {err} {_deployment_message()}", file=sys.stderr)
        serve.delete(APP_NAME)
        return 1
    stop, received = threading.Event(), []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: (received.append(signum), stop.set()))
    print(f"fluxrt serving {args.model} on Ray Serve at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    stop.wait()
    serve.delete(APP_NAME)  # waits for the replicas to answer what they hold
    print("fluxrt: stopped", flush=True)
    return EXIT_INTERRUPTED if signal.SIGINT in received else 0  # as `fluxrt serve`: Ctrl-C is 130, SIGTERM 0


def _deployment_message() -> str:
    """What Ray Serve says went wrong with the replicas: the last line of the failing replica's traceback (the
    error itself; the whole traceback is in the replica's log)."""
    app = serve.status().applications.get(APP_NAME)
    deployments = app.deployments.values() if app else ()
    messages = [d.message.strip().splitlines()[-1] for d in deployments if d.message.strip()]
    return "; ".join(messages) or "(see the Ray logs: `ray logs`)"


def _autoscaling(args, parser: argparse.ArgumentParser) -> dict | None:
    """--max-replicas: Ray adds replicas (from --replicas up to it) while each has more than a full batch waiting."""
    if not args.max_replicas:
        return None
    if args.max_replicas < args.replicas:
        parser.error(f"--max-replicas ({args.max_replicas}) must be at least --replicas ({args.replicas})")
    return {"min_replicas": args.replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": args.max_batch}


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x1024, got {text!r}")
    return int(width), int(height)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fluxrt.serve.ray", description=(
        "Serve a FLUX model on a running Ray cluster (`ray start --head`, then `ray start --address=HEAD:6379` on "
        "the other nodes): replicas of the `fluxrt serve` engine, one per GPU, behind Ray Serve's HTTP proxy."))
    parser.add_argument("--model", default="tiny-random",
                        help="a FLUX folder (the same path on every node), tiny, or tiny-random[-fill|-canny|-kontext]")
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: the one this node joined)")
    parser.add_argument("--host", default="127.0.0.1", help="Ray Serve's HTTP host (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="Ray Serve's HTTP port (on every node)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (with --max-replicas: the fewest)")
    parser.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this many")
    parser.add_argument("--gpus-per-replica", type=float, default=1, help="0: CPU replicas")
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="fluxrt.compile backend")
    parser.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                        help="a LoRA file every replica loads hot-swapped (requests name it by its stem); repeatable")
    parser.add_argument("--batching", default="step", choices=BATCHING_KINDS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_ENGINE_TIMEOUT_S, help="seconds per request; 0: none")
    parser.add_argument("--api-key", default=os.environ.get("FLUXRT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/ (default: $FLUXRT_API_KEY; unset: open)")
    parser.add_argument("--size", type=_size, help="WxH of a request without size (default 1024x1024)")
    parser.add_argument("--warmup", type=lambda text: [_size(size.strip()) for size in text.split(",") if size.strip()],
                        default=[], metavar="WxH,...", help="sizes each replica generates once before taking requests")
    return parser


if __name__ == "__main__":
    # run the importable module's main: Ray then ships its replica classes by reference (fluxrt.serve.ray.…), as
    # for a library user, rather than by value from __main__
    from fluxrt.serve.ray import main as module_main

    sys.exit(module_main())
