"""The serving engine: a bounded queue of jobs in front of one worker thread that drives a Batcher.

    engine = Engine(pipe, max_batch=4, max_queue=64, batching="step", timeout_s=600)
    engine.start()
    job = engine.submit(GenerationRequest("a cat", width=512, height=512, seed=1))   # checked now: bad -> ValueError
    result = job.future.result()                                                   # a GenerationResult
    engine.shutdown()                                                              # finishes what was accepted

One worker owns the pipeline (one GPU): at each step boundary it drops cancelled and timed-out jobs, admits queued
jobs the batcher can take (fluxrt.serve.batching: step-level, request-level or serial), and runs one batcher step.
Jobs are admitted in arrival order: the head of the queue waits for a batch it fits, and nothing behind it jumps
ahead (no starvation). A timer thread fails a job whose deadline passes (JobTimeout) at once, wherever it is; the
worker removes it from the batch at the next boundary. A step that raises fails the jobs in flight, never the worker.

Errors a caller sees: submit raises the request's TypeError / ValueError / KeyError (a bad request: nothing queued),
QueueFull (max_queue jobs wait; retry after QueueFull.retry_after_s) or EngineDraining (shutdown began); a job's
future raises JobTimeout, CancelledError (Job.cancel), or returns a GenerationResult whose .error says why it failed.
Metrics are Prometheus text (Engine.metrics()): jobs by outcome, queue depth, batch sizes, step latency, images/s;
the HTTP layer adds its request and error counts through Engine.stats.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..serving import GenerationRequest, GenerationResult, resolve
from .batching import make_batcher

IMAGES_PER_SECOND_WINDOW_S = 60.0
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class QueueFull(RuntimeError):
    """max_queue jobs already wait: the HTTP layer answers 429 with Retry-After: retry_after_s."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDraining(RuntimeError):
    """The engine is shutting down (or never started): it accepts no new jobs (HTTP 503)."""


class JobTimeout(TimeoutError):
    """The job was not done within the engine's timeout_s (HTTP 504); it left the queue or the batch."""


@dataclass(eq=False)
class Job:
    """One accepted request (resolved: seed and defaults filled in). future resolves to its GenerationResult."""

    id: int
    request: GenerationRequest
    deadline: float | None  # time.monotonic() seconds; None: no timeout
    engine: Engine = field(repr=False)
    submitted: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    def cancel(self) -> bool:
        """Cancel the job: a queued one leaves the queue, a running one leaves the batch at the next step boundary;
        the future raises CancelledError. False when it had already finished."""
        return self.engine._abandon(self, "cancelled", None)


class Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6g}",
                      f"{name}_count {self.count}"]


class Stats:
    """The counters behind Engine.metrics(); thread-safe. count_request is the HTTP layer's."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.jobs: dict[str, int] = {}  # by outcome: completed, failed, cancelled, timeout
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self.step_seconds = Histogram(STEP_SECONDS_BUCKETS)
        self.job_seconds: deque[float] = deque(maxlen=32)  # recent submit-to-done times: Retry-After's estimate
        self.finished_at: deque[float] = deque()  # completion times within the images/s window
        self.started = time.monotonic()

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def count_error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_job(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.jobs[outcome] = self.jobs.get(outcome, 0) + 1
            if outcome == "completed":
                self.job_seconds.append(seconds)
                self.finished_at.append(time.monotonic())

    def count_step(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.batch_size.observe(rows)
            self.step_seconds.observe(seconds)

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.finished_at and self.finished_at[0] < now - IMAGES_PER_SECOND_WINDOW_S:
                self.finished_at.popleft()
            window = min(IMAGES_PER_SECOND_WINDOW_S, max(now - self.started, 1e-9))
            return len(self.finished_at) / window

    def mean_job_seconds(self) -> float | None:
        with self.lock:
            return sum(self.job_seconds) / len(self.job_seconds) if self.job_seconds else None


def _labels(**labels) -> str:
    text = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in labels.items())
    return "{" + text + "}"


class Engine:
    """See the module docstring. max_batch: images per step; max_queue: jobs waiting (not yet in the batch);
    batching: "step" | "request" | "serial"; timeout_s: seconds from submit to done (None: no limit)."""

    def __init__(self, pipe, max_batch: int = 4, max_queue: int = 64, batching: str = "step",
                 timeout_s: float | None = 600):
        self.max_queue = _positive_int(max_queue, "max_queue")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
        self.pipe, self.batching, self.timeout_s = pipe, batching, timeout_s
        self._batcher = make_batcher(batching, pipe, max_batch)  # checks kind and max_batch
        self.max_batch = self._batcher.max_batch
        self.stats = Stats()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the worker waits here for jobs, drops or shutdown
        self._timer = threading.Condition(self._lock)  # the timeout thread waits here for the next deadline
        self._queue: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # admitted into the batcher
        self._to_drop: set[int] = set()  # running jobs abandoned since the last step boundary
        self._deadlines: list[tuple[float, int, Job]] = []  # heap
        self._ids = itertools.count()
        self._accepting = self._stopping = False
        self._threads: list[threading.Thread] = []

    # ---- life cycle ----

    def start(self) -> Engine:
        with self._lock:
            if self._threads:
                raise RuntimeError("the engine is already started (an Engine runs once)")
            self._accepting = True
            self._threads = [threading.Thread(target=self._work_loop, name="fluxrt-serve-worker", daemon=True),
                             threading.Thread(target=self._timeout_loop, name="fluxrt-serve-timeouts", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        """Started, and the worker is alive."""
        return bool(self._threads) and self._threads[0].is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.running

    def stop_accepting(self) -> None:
        """The first half of a graceful shutdown: new submits get EngineDraining; accepted jobs still run."""
        with self._lock:
            self._accepting = False

    def shutdown(self, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stop accepting; with drain, finish every queued and running job first, else cancel them. Waits up to
        timeout_s (None: as long as it takes); True when the worker has stopped."""
        with self._lock:
            self._accepting = False
            if not drain:
                for job in list(self._queue) + list(self._running.values()):
                    self._abandon_locked(job, "cancelled", None)
            self._stopping = True
            self._work.notify_all()
            self._timer.notify_all()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # ---- submitting ----

    def submit(self, request: GenerationRequest) -> Job:
        """One job for `request` (see submit_all)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[Job]:
        """One job per request, all queued or none: each request is resolved first (its TypeError / ValueError /
        KeyError says what is wrong), then QueueFull if they do not all fit in the queue, EngineDraining once
        shutdown began."""
        resolved = [resolve(self.pipe, request) for request in requests]
        with self._lock:
            if not self.accepting:
                raise EngineDraining("the server is shutting down and accepts no new requests; retry on another "
                                     "replica or after it restarts")
            if len(resolved) > self.max_queue:
                raise ValueError(f"{len(resolved)} images in one request never fit the queue of {self.max_queue} "
                                 "(--max-queue): ask for fewer")
            if len(self._queue) + len(resolved) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._queue)} of {self.max_queue} waiting); retry later",
                                self._retry_after_s())
            now = time.monotonic()
            deadline = None if self.timeout_s is None else now + self.timeout_s
            jobs = [Job(next(self._ids), request, deadline, self, submitted=now) for request in resolved]
            self._queue.extend(jobs)
            for job in jobs if deadline is not None else ():
                heapq.heappush(self._deadlines, (deadline, job.id, job))
            self._work.notify_all()
            self._timer.notify_all()
        return jobs

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely moved: the recent time per job times the queue's batches."""
        per_job = self.stats.mean_job_seconds()
        if per_job is None:
            return 1
        return min(60, max(1, math.ceil(per_job * len(self._queue) / self.max_batch)))

    # ---- abandoning (cancel, timeout, shutdown without drain) ----

    def _abandon(self, job: Job, outcome: str, error: BaseException | None) -> bool:
        with self._lock:
            return self._abandon_locked(job, outcome, error)

    def _abandon_locked(self, job: Job, outcome: str, error: BaseException | None) -> bool:
        if job.future.done():
            return False
        if job in self._queue:
            self._queue.remove(job)
        elif job.id in self._running:
            self._to_drop.add(job.id)  # the worker drops it from the batcher at the next step boundary
            self._work.notify_all()
        if error is None:
            job.future.cancel()
        else:
            job.future.set_exception(error)
        self.stats.count_job(outcome, time.monotonic() - job.submitted)
        return True

    def _timeout_loop(self) -> None:
        with self._lock:
            while not (self._stopping and not self._queue and not self._running):
                if not self._deadlines:
                    self._timer.wait()
                    continue
                deadline, _, job = self._deadlines[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._timer.wait(wait)
                    continue
                heapq.heappop(self._deadlines)
                self._abandon_locked(job, "timeout", JobTimeout(
                    f"the request was not done within the server's timeout of {self.timeout_s:g} s (--timeout); "
                    "retry later or ask for fewer steps or pixels"))

    # ---- the worker ----

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                while not (self._queue or self._running or self._stopping):
                    self._work.wait()
                self._drop_abandoned()
                if self._stopping and not self._queue and not self._running:
                    self._timer.notify_all()
                    return
                self._admit_queued()
                if self._queue and not len(self._batcher):
                    self._refuse_head()  # an empty batcher that admits nothing would spin this loop forever
            if len(self._batcher):  # also when only dropped jobs are left: the step lets them go
                self._step()

    def _drop_abandoned(self) -> None:
        for job_id in self._to_drop:
            if self._running.pop(job_id, None) is not None:
                self._batcher.drop(job_id)
        self._to_drop.clear()

    def _admit_queued(self) -> None:
        while self._queue and self._batcher.admits(self._queue[0].request):
            job = self._queue.popleft()
            self._batcher.admit(job.id, job.request)
            self._running[job.id] = job

    def _refuse_head(self) -> None:
        job = self._queue.popleft()
        error = "the batcher cannot run this request (it admits nothing else either): a fluxrt bug, please report it"
        job.future.set_result(GenerationResult(job.request, error=error))
        self.stats.count_job("failed", time.monotonic() - job.submitted)

    def _step(self) -> None:
        self._batcher.last_step = None  # a step that only lets dropped jobs go runs no batch: nothing to count
        try:
            results = self._batcher.step()
        except Exception as err:  # noqa: BLE001 -- a failed step fails its jobs, never the worker
            self._fail_running(err)
            return
        if self._batcher.last_step is not None:
            self.stats.count_step(*self._batcher.last_step)
        with self._lock:
            for job_id, result in results.items():
                job = self._running.pop(job_id, None)
                if job is not None and not job.future.done():
                    job.future.set_result(result)
                    self.stats.count_job("completed" if result.ok else "failed", time.monotonic() - job.submitted)

    def _fail_running(self, err: Exception) -> None:
        with self._lock:
            for job_id, job in list(self._running.items()):
                self._batcher.drop(job_id)
                del self._running[job_id]
                if not job.future.done():
                    job.future.set_result(GenerationResult(job.request, error=f"{type(err).__name__}: {err}"))
                    self.stats.count_job("failed", time.monotonic() - job.submitted)

    # ---- metrics ----

    def metrics(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        stats = self.stats
        with self._lock:
            queued, running = len(self._queue), len(self._running)
        images_per_s = stats.images_per_second()
        with stats.lock:
            lines = _family("fluxrt_requests_total", "counter", "HTTP requests by endpoint and status code",
                            [f"fluxrt_requests_total{_labels(endpoint=e, status=s)} {n}"
                             for (e, s), n in sorted(stats.requests.items())])
            lines += _family("fluxrt_errors_total", "counter", "error answers by kind (their OpenAI error code)",
                             [f"fluxrt_errors_total{_labels(kind=k)} {n}" for k, n in sorted(stats.errors.items())])
            lines += _family("fluxrt_jobs_total", "counter", "images by outcome: completed, failed, cancelled, timeout",
                             [f"fluxrt_jobs_total{_labels(outcome=k)} {n}" for k, n in sorted(stats.jobs.items())])
            lines += _family("fluxrt_queue_depth", "gauge", "jobs waiting to join a batch",
                             [f"fluxrt_queue_depth {queued}"])
            lines += _family("fluxrt_jobs_running", "gauge", "jobs in the running batch",
                             [f"fluxrt_jobs_running {running}"])
            lines += _family("fluxrt_batch_size", "histogram", "rows in each step's transformer batch",
                             stats.batch_size.lines("fluxrt_batch_size"))
            lines += _family("fluxrt_step_seconds", "histogram", "seconds per batcher step",
                             stats.step_seconds.lines("fluxrt_step_seconds"))
        lines += _family("fluxrt_images_per_second", "gauge",
                         f"images completed per second over the last {IMAGES_PER_SECOND_WINDOW_S:g} s",
                         [f"fluxrt_images_per_second {images_per_s:.6g}"])
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value
