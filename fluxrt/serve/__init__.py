"""fluxrt.serve: the OpenAI-compatible image server (`fluxrt serve`).

- engine.py: Engine, a bounded job queue in front of one worker thread per pipeline (replicas: `fluxrt serve
  --replicas N`), each driving its Batcher; per-request timeout, cancellation, graceful shutdown, Prometheus metrics.
  A context-parallel server (`torchrun ... fluxrt serve --cp ...`) is one engine whose pipeline's transformer spans
  the ranks (fluxrt.parallel_engine).
- batching.py: the Batchers the worker drives ("step": step-level batching, "request", "serial").
- app.py: create_app(engine, model_name, api_key), the FastAPI app (/v1/images/generations, /v1/images/edits,
  /v1/models, /health, /ready, /metrics) with OpenAI's request and error shapes.
- ray.py: a Ray Serve deployment around the same engine and app (optional extra fluxrt[ray]).

The command is `fluxrt serve` (fluxrt/cli.py). Importing this package imports neither FastAPI nor Ray.
"""
