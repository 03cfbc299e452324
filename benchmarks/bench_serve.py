"""Serving throughput and latency against concurrency: step-level vs request-level batching vs one at a time.

For each batching kind ("step", "request", "serial") and each concurrency C, a fresh fluxrt.serve.engine.Engine
(max_batch, one worker) serves the same fixed set of requests (mixed step counts, one size, seed = index) to C client
threads, each submitting its next request when the previous one is answered. Clients are threads in this process
calling Engine.submit (no HTTP: the numbers are the engine's and the batchers', not uvicorn's or the network's).
Per (kind, C): images/s over the run (requests / wall time; with --repeats the median of interleaved runs), latency
p50 / p99 (submit to result), and the mean rows per transformer call. Each image is checked against
pipe.generate([request]) alone (within one 8-bit level) unless --no-verify: nothing lost or mixed up.

    python benchmarks/bench_serve.py                      # tiny-random on the CPU -> results/serve_cpu_<date>.json/.md
    python benchmarks/bench_serve.py --model /models/FLUX.1-dev --size 1024x1024 --steps 20,28,36 --no-verify
    python benchmarks/bench_serve.py --dry-run --out /tmp/serve.json   # seconds: proves the script works

CPU runs of the tiny random model are labelled as such: they show the scheduling's effect, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

KINDS = ("step", "request", "serial")
PROMPTS = ("a red apple on a wooden table", "a cat sitting on a windowsill", "a lighthouse in a storm",
           "a bowl of fresh fruit", "a mountain at sunset", "a robot reading a newspaper")
DRY_RUN = dict(concurrency=[1, 4], requests=6, steps=[1, 2, 3], size=(32, 32), max_batch=4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random", help="a model folder (FluxPipeline.from_pretrained) or "
                        "tiny-random (default: random tiny weights, CPU unless a GPU is present)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client threads per run")
    parser.add_argument("--requests", type=int, default=32, help="requests per (kind, concurrency) run")
    parser.add_argument("--steps", default="2,4,8", help="the step counts the requests cycle through")
    parser.add_argument("--size", default="64x64", help="WxH of every request (one size: all may share a batch)")
    parser.add_argument("--max-batch", type=int, default=8, help="the engine's max_batch")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--repeats", type=int, default=1, help="runs per (kind, clients), interleaved: images/s is "
                        "their median (a shared machine's noise), latencies pool their requests")
    parser.add_argument("--no-verify", action="store_true", help="skip checking each image against generate alone")
    parser.add_argument("--dry-run", action="store_true", help=f"a few seconds' run: {DRY_RUN}")
    parser.add_argument("--out", type=Path, help="the JSON path (a .md table beside it); default "
                        "benchmarks/results/serve_<cpu|gpu>_<date>.json")
    args = parser.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        counts = (min(args.steps), min(args.concurrency), args.requests, args.repeats)
        if len(args.size) != 2 or min(counts) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--steps takes positive ints like 2,4,8, --size WxH like 64x64, --concurrency and --requests "
                     f"--repeats positive ints; got --steps {args.steps} --size {args.size}")
    if args.dry_run:
        args.concurrency, args.requests, args.steps = DRY_RUN["concurrency"], DRY_RUN["requests"], DRY_RUN["steps"]
        args.size, args.max_batch = DRY_RUN["size"], DRY_RUN["max_batch"]
    return args


def load_pipeline(model: str):
    import fluxrt
    from fluxrt.tiny import tiny_random_pipeline

    if model == "tiny-random":
        return tiny_random_pipeline(progress=False)
    return fluxrt.FluxPipeline.from_pretrained(model, progress=False)


def make_requests(args) -> list:
    from fluxrt import GenerationRequest

    width, height = args.size
    return [GenerationRequest(PROMPTS[i % len(PROMPTS)], width=width, height=height,
                              num_steps=args.steps[i % len(args.steps)], seed=i) for i in range(args.requests)]


def serve(pipe, kind: str, concurrency: int, requests: list, max_batch: int) -> dict:
    """One run: a fresh Engine, `concurrency` client threads sharing the request list; returns timings and images."""
    from fluxrt.serve.engine import Engine

    engine = Engine(pipe, max_batch=max_batch, max_queue=max(64, concurrency), batching=kind, timeout_s=None).start()
    next_index, lock = iter(range(len(requests))), threading.Lock()
    latencies, results = [0.0] * len(requests), [None] * len(requests)

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            sent = time.perf_counter()
            results[i] = engine.submit(requests[i]).future.result()
            latencies[i] = time.perf_counter() - sent

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    rows = engine.stats.batch_size
    engine.shutdown()
    return {"seconds": wall, "latencies": latencies, "rows": rows.sum, "steps": rows.count, "results": results}


def summary(kind: str, concurrency: int, runs: list[dict]) -> dict:
    """One table row from repeated runs: the median run's images/s, latency percentiles over every request."""
    latencies = [s for run in runs for s in run["latencies"]]
    requests = len(runs[0]["latencies"])
    steps = sum(run["steps"] for run in runs)
    return {"kind": kind, "concurrency": concurrency, "requests": requests, "repeats": len(runs),
            "images_per_s": round(float(np.median([requests / run["seconds"] for run in runs])), 3),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p99_s": round(float(np.percentile(latencies, 99)), 4),
            "mean_rows_per_call": round(sum(run["rows"] for run in runs) / max(steps, 1), 2),
            "batcher_steps": steps // len(runs)}


def mismatches(results: list, alone: list) -> list[str]:
    """What differs from each request's image alone (more than one 8-bit level, a failure, a missing result)."""
    problems = []
    for i, (result, expected) in enumerate(zip(results, alone)):
        if result is None or not result.ok:
            problems.append(f"request {i}: {'no result' if result is None else result.error}")
            continue
        gap = np.abs(np.asarray(result.image).astype(int) - np.asarray(expected.image).astype(int)).max()
        if gap > 1:
            problems.append(f"request {i}: {gap} levels from its image alone")
    return problems


def device_label(pipe, model: str) -> tuple[str, str]:
    """(file tag, label): CPU runs of the tiny model say they are no GPU claim."""
    if pipe.device.type == "cuda":
        return _common.gpu_slug(), f"{torch.cuda.get_device_name()}, {model}"
    cores = len(os.sched_getaffinity(0))
    return "cpu", f"CPU, {model} model, {cores} cores: not a GPU claim"


def write_table(path: Path, meta: dict, rows: list[dict]) -> None:
    lines = [f"# bench_serve: {meta['label']}", "",
             f"{meta['transport']}. {meta['requests']} requests of {meta['size']} with steps cycling {meta['steps']}, "
             f"max_batch {meta['max_batch']}; images/s the median of {meta['repeats']} interleaved runs, latencies "
             f"over all their requests; commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, "
             f"{meta['threads']} torch threads, load average {meta['load_average_1m_at_end']} at the end.", "",
             "| batching | clients | images/s | p50 latency (s) | p99 latency (s) | rows per transformer call | "
             "batcher steps per run |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['latency_p50_s']:.3f} | "
              f"{r['latency_p99_s']:.3f} | {r['mean_rows_per_call']:.2f} | {r['batcher_steps']} |" for r in rows]
    lines += ["", "Rows per transformer call: the jobs sharing each call (step batching) or each batch (request, "
              "serial). Batcher steps: denoising steps for step batching, whole batches for the others."]
    if meta["device"] == "cpu":
        lines += ["On a CPU the tiny transformer's cost grows in proportion to its rows and the text encoders and "
                  "autoencoder take much of each image's time, so sharing a step saves little here: these numbers "
                  "show the scheduling (who waits for whom), not what batching gains on a GPU."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    pipe = load_pipeline(args.model)
    requests = make_requests(args)
    from fluxrt.serving import resolve

    requests = [resolve(pipe, r) for r in requests]  # checked once: a bad --size or --steps fails before any run
    alone = None if args.no_verify else pipe.generate(requests, max_batch_size=1)
    serve(pipe, "serial", 1, requests[:1], 1)  # warm-up: first-call costs are nobody's
    runs: dict[tuple, list] = {}
    for _ in range(args.repeats):  # kinds interleaved, so a busy moment of a shared machine hits each alike
        for concurrency in args.concurrency:
            for kind in args.kinds:
                run = serve(pipe, kind, concurrency, requests, args.max_batch)
                if alone is not None and (problems := mismatches(run["results"], alone)):
                    raise SystemExit(f"bench_serve: {kind} batching at {concurrency} clients changed images: "
                                     f"{problems[:3]}")
                runs.setdefault((kind, concurrency), []).append(run)
    rows = [dict(summary(kind, concurrency, group), verified=alone is not None)
            for (kind, concurrency), group in runs.items()]
    for row in rows:
        print(f"{row['kind']:8s} clients={row['concurrency']:3d}  {row['images_per_s']:8.2f} images/s  p50 "
              f"{row['latency_p50_s']:.3f} s  p99 {row['latency_p99_s']:.3f} s  rows/call "
              f"{row['mean_rows_per_call']:.2f}", flush=True)
    tag, label = device_label(pipe, args.model)
    now = datetime.now(timezone.utc)
    meta = {"label": label, "model": args.model, "device": str(pipe.device), "dtype": str(pipe.dtype),
            "transport": "in process: client threads calling Engine.submit, no HTTP", "requests": args.requests,
            "size": f"{args.size[0]}x{args.size[1]}", "steps": args.steps, "max_batch": args.max_batch,
            "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2), "commit": _common._git_commit(),
            "date": now.isoformat(timespec="seconds")}
    out = args.out or _common.RESULTS / f"serve_{tag}_{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_table(out.with_suffix(".md"), meta, rows)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
