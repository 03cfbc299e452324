"""The serving engine: a bounded queue of jobs in front of one or more pipelines ("lanes"), each driven by its own
worker thread and Batcher.

    engine = Engine(pipe, max_batch=4, max_queue=64, batching="step", timeout_s=600)   # or Engine([pipe0, pipe1])
    engine.start()
    job = engine.submit(GenerationRequest("a cat", width=512, height=512, seed=1))   # checked now: bad -> ValueError
    result = job.future.result()                                                   # a GenerationResult
    engine.shutdown()                                                              # finishes what was accepted

Each lane's worker owns its pipeline (one device; several lanes are replicas of one model on several GPUs, `fluxrt
serve --replicas N`): at each step boundary it drops cancelled and timed-out jobs, admits queued jobs its batcher can
take (fluxrt.serve.batching: step-level, request-level or serial), and runs one batcher step. Jobs are admitted in
arrival order from the one shared queue: the head waits for a batch it fits, and nothing behind it jumps ahead (no
starvation). An idle lane takes the head at once; a lane that already runs jobs admits more only while no lane is
idle, so a new job starts on an idle replica instead of joining a busy batch. A timer thread fails a job whose deadline
passes (JobTimeout) at once, wherever it is; the lane running it removes it from its batch at the next boundary. A step
that raises fails that lane's jobs in flight, never its worker.

health_check(pipe) -> None | str, asked after each of a lane's steps, says when a pipeline can run no more jobs (rank 0
of a context-parallel group that lost a rank: fluxrt.cli): that lane's failed jobs report the reason and it takes no
more jobs; once every lane is so, queued jobs fail with the reason, submit raises EngineFailed and `accepting` is
False (the HTTP layer's /ready answers 503).

A request with on_step or on_preview (fluxrt.serving.GenerationRequest) hears of each step (progress) or gets live
previews from its lane's step batcher; submit refuses one (ValueError) when the engine's batching is not "step".

Errors a caller sees: submit raises the request's TypeError / ValueError / KeyError (a bad request: nothing queued),
QueueFull (max_queue jobs wait; retry after QueueFull.retry_after_s), EngineDraining (shutdown began) or EngineFailed
(no lane can run jobs); a job's future raises JobTimeout, CancelledError (Job.cancel), or returns a GenerationResult
whose .error says why it failed. Metrics are Prometheus text (Engine.metrics()): jobs by outcome, queue depth, batch
sizes, step latency, images/s, and per lane ("replica") the jobs it took, runs and whether it is up; the HTTP layer
adds its request and error counts through Engine.stats.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
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


class EngineFailed(EngineDraining):
    """Every lane's health_check failed (a context-parallel group lost a rank): no job can run here any more (HTTP
    503, as a draining engine: send the work elsewhere)."""


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
    replica: int | None = None  # the lane that admitted it (None while queued)

    def cancel(self) -> bool:
        """Cancel the job: a queued one leaves the queue, a running one leaves its batch at the next step boundary;
        the future raises CancelledError. False when it had already finished."""
        return self.engine._abandon(self, "cancelled", None)


class Lane:
    """One pipeline and its batcher, driven by one worker thread. The engine's lock guards running, to_drop, admitted
    and failure; only the lane's own worker calls its batcher."""

    def __init__(self, index: int, pipe, batcher):
        self.index, self.pipe, self.batcher = index, pipe, batcher
        self.running: dict[int, Job] = {}  # admitted into the batcher
        self.to_drop: set[int] = set()  # running jobs abandoned since the last step boundary
        self.admitted = 0  # jobs taken from the queue (fluxrt_replica_jobs_total)
        self.failure: str | None = None  # why this pipeline can run no more jobs (the engine's health_check)

    @property
    def idle(self) -> bool:
        """Runs nothing and could: where the queue's head should go first."""
        return not self.running and self.failure is None


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
    """See the module docstring. pipes: one pipeline, or a list of replicas of one model (one lane each, on their
    own devices); max_batch: images per step of each lane; max_queue: jobs waiting (not yet in a batch); batching:
    "step" | "request" | "serial"; timeout_s: seconds from submit to done (None: no limit); health_check: see the
    module docstring (None: a pipeline never fails for good)."""

    def __init__(self, pipes, max_batch: int = 4, max_queue: int = 64, batching: str = "step",
                 timeout_s: float | None = 600, health_check: Callable[[object], str | None] | None = None):
        pipes = _replicas(pipes)
        self.max_queue = _positive_int(max_queue, "max_queue")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
        self.pipes, self.batching, self.timeout_s, self.health_check = pipes, batching, timeout_s, health_check
        self.pipe = pipes[0]  # what requests are resolved against (the replicas are one model)
        self._lanes = [Lane(i, pipe, make_batcher(batching, pipe, max_batch)) for i, pipe in enumerate(pipes)]
        self.max_batch = self._lanes[0].batcher.max_batch
        self.stats = Stats()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the workers wait here for jobs, drops or shutdown
        self._timer = threading.Condition(self._lock)  # the timeout thread waits here for the next deadline
        self._queue: deque[Job] = deque()
        self._deadlines: list[tuple[float, int, Job]] = []  # heap
        self._ids = itertools.count()
        self._accepting = self._stopping = False
        self._workers: list[threading.Thread] = []
        self._threads: list[threading.Thread] = []

    # ---- life cycle ----

    def start(self) -> Engine:
        with self._lock:
            if self._threads:
                raise RuntimeError("the engine is already started (an Engine runs once)")
            self._accepting = True
            self._workers = [threading.Thread(target=self._work_loop, args=(lane,), daemon=True,
                                              name=f"fluxrt-serve-worker-{lane.index}") for lane in self._lanes]
            self._threads = self._workers + [threading.Thread(target=self._timeout_loop, name="fluxrt-serve-timeouts",
                                                              daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        """Started, and every lane's worker is alive."""
        return bool(self._workers) and all(worker.is_alive() for worker in self._workers)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.running and self.failure is None

    @property
    def failure(self) -> str | None:
        """Why no lane can run jobs any more (health_check), or None while one can."""
        with self._lock:
            return self._failure_locked()

    def _failure_locked(self) -> str | None:
        failures = [lane.failure for lane in self._lanes]
        if None in failures:
            return None
        if len(failures) == 1:
            return failures[0]
        return "every replica failed: " + "; ".join(f"replica {i}: {reason}" for i, reason in enumerate(failures))

    def stop_accepting(self) -> None:
        """The first half of a graceful shutdown: new submits get EngineDraining; accepted jobs still run."""
        with self._lock:
            self._accepting = False

    def shutdown(self, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stop accepting; with drain, finish every queued and running job first, else cancel them. Waits up to
        timeout_s (None: as long as it takes); True when the workers have stopped."""
        with self._lock:
            self._accepting = False
            if not drain:
                for job in list(self._queue) + [job for lane in self._lanes for job in lane.running.values()]:
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
        shutdown began, EngineFailed once no lane can run jobs."""
        resolved = [self._check_step_callbacks(resolve(self.pipe, request)) for request in requests]
        with self._lock:
            failure = self._failure_locked()
            if failure is not None:
                raise EngineFailed(f"this server cannot run requests any more: {failure}")
            if not (self._accepting and self.running):
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

    def _check_step_callbacks(self, request: GenerationRequest) -> GenerationRequest:
        """Progress (request.on_step) and live previews (request.on_preview, every preview_every steps: a positive
        int) are called by the step batcher only (fluxrt.serve.batching)."""
        if request.on_step is None and request.on_preview is None:
            return request
        if self.batching != "step":
            asked = "live previews" if request.on_preview is not None else "progress events"
            raise ValueError(f"{asked} need step-level batching; this server runs --batching {self.batching} "
                             "(restart it with --batching step, or ask without previews and progress)")
        if request.on_step is not None and not callable(request.on_step):
            raise TypeError(f"on_step must be a function (step, total), got {type(request.on_step).__name__}")
        if request.on_preview is None:
            return request
        every = request.preview_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"preview_every must be a positive int (steps between previews), got {every!r}")
        if not callable(request.on_preview):
            raise TypeError("on_preview must be a function (step, total, rgb), got "
                            f"{type(request.on_preview).__name__}")
        return request

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely moved: the recent time per job times the queue's batches (spread over
        the lanes that run)."""
        per_job = self.stats.mean_job_seconds()
        if per_job is None:
            return 1
        lanes = sum(lane.failure is None for lane in self._lanes)
        return min(60, max(1, math.ceil(per_job * len(self._queue) / (self.max_batch * max(lanes, 1)))))

    # ---- abandoning (cancel, timeout, shutdown without drain) ----

    def _abandon(self, job: Job, outcome: str, error: BaseException | None) -> bool:
        with self._lock:
            return self._abandon_locked(job, outcome, error)

    def _abandon_locked(self, job: Job, outcome: str, error: BaseException | None) -> bool:
        if job.future.done():
            return False
        if job in self._queue:
            self._queue.remove(job)
        else:
            lane = next((lane for lane in self._lanes if job.id in lane.running), None)
            if lane is not None:
                lane.to_drop.add(job.id)  # its worker drops it from the batcher at the next step boundary
                self._work.notify_all()
        if error is None:
            job.future.cancel()
        else:
            job.future.set_exception(error)
        self.stats.count_job(outcome, time.monotonic() - job.submitted)
        return True

    def _timeout_loop(self) -> None:
        with self._lock:
            while not (self._stopping and not self._queue and not any(lane.running for lane in self._lanes)):
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

    # ---- the workers ----

    def _work_loop(self, lane: Lane) -> None:
        while True:
            with self._lock:
                while not self._has_work(lane):
                    self._work.wait()
                self._drop_abandoned(lane)
                if self._stopping and not lane.running and (not self._queue or lane.failure is not None):
                    self._work.notify_all()  # the last lane out lets the timer thread go
                    self._timer.notify_all()
                    return
                self._admit_queued(lane)
                if self._queue and not len(lane.batcher):
                    self._refuse_head()  # an empty batcher that admits nothing would spin this loop forever
            if len(lane.batcher):  # also when only dropped jobs are left: the step lets them go
                self._step(lane)

    def _has_work(self, lane: Lane) -> bool:
        """Whether the lane's worker has something to do (else it waits): a failed lane takes nothing queued (it
        exits once stopping, before it could admit)."""
        return bool(lane.running or lane.to_drop or self._stopping or (self._queue and lane.failure is None))

    def _drop_abandoned(self, lane: Lane) -> None:
        for job_id in lane.to_drop:
            if lane.running.pop(job_id, None) is not None:
                lane.batcher.drop(job_id)
        lane.to_drop.clear()

    def _admit_queued(self, lane: Lane) -> None:
        while self._queue and self._may_take(lane) and lane.batcher.admits(self._queue[0].request):
            job = self._queue.popleft()
            lane.batcher.admit(job.id, job.request)
            lane.running[job.id] = job
            lane.admitted += 1
            job.replica = lane.index

    def _may_take(self, lane: Lane) -> bool:
        """An idle lane takes the queue's head; a busy one only while no lane is idle (a replica that runs nothing
        finishes a new job sooner than a batch that grows)."""
        return not lane.running or not any(other.idle for other in self._lanes)

    def _refuse_head(self) -> None:
        job = self._queue.popleft()
        error = "the batcher cannot run this request (it admits nothing else either): a fluxrt bug, please report it"
        self._finish(job, GenerationResult(job.request, error=error))

    def _step(self, lane: Lane) -> None:
        lane.batcher.last_step = None  # a step that only lets dropped jobs go runs no batch: nothing to count
        try:
            results, error = lane.batcher.step(), None
        except Exception as err:  # noqa: BLE001 -- a failed step fails its jobs, never the worker
            results, error = {}, f"{type(err).__name__}: {err}"
        if error is None and lane.batcher.last_step is not None:
            self.stats.count_step(*lane.batcher.last_step)
        failure = None if self.health_check is None else self.health_check(lane.pipe)
        with self._lock:
            for job_id, result in results.items():
                job = lane.running.pop(job_id, None)
                if job is not None and not job.future.done():
                    if failure is not None and not result.ok:  # the reason, not the symptom
                        result = GenerationResult(result.request, error=failure)
                    self._finish(job, result)
            if error is not None or failure is not None:
                self._fail_running(lane, failure or error)
            if failure is not None and lane.failure is None:
                self._retire(lane, failure)

    def _fail_running(self, lane: Lane, error: str) -> None:
        for job_id, job in list(lane.running.items()):
            lane.batcher.drop(job_id)
            del lane.running[job_id]
            if not job.future.done():
                self._finish(job, GenerationResult(job.request, error=error))

    def _retire(self, lane: Lane, failure: str) -> None:
        """The lane takes no more jobs; with it the last, the queued jobs fail too (nothing will run them)."""
        lane.failure = failure
        if self._failure_locked() is not None:
            while self._queue:
                job = self._queue.popleft()
                self._finish(job, GenerationResult(job.request, error=failure))
        self._work.notify_all()  # a busy lane that waited for this one to be idle may admit now
        self._timer.notify_all()

    def _finish(self, job: Job, result: GenerationResult) -> None:
        job.future.set_result(result)
        self.stats.count_job("completed" if result.ok else "failed", time.monotonic() - job.submitted)

    # ---- metrics ----

    def metrics(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        stats = self.stats
        with self._lock:
            queued = len(self._queue)
            lanes = [(lane.index, lane.admitted, len(lane.running), lane.failure is None) for lane in self._lanes]
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
            lines += _family("fluxrt_jobs_running", "gauge", "jobs in the running batches",
                             [f"fluxrt_jobs_running {sum(running for _, _, running, _ in lanes)}"])
            lines += _family("fluxrt_batch_size", "histogram", "rows in each step's transformer batch",
                             stats.batch_size.lines("fluxrt_batch_size"))
            lines += _family("fluxrt_step_seconds", "histogram", "seconds per batcher step",
                             stats.step_seconds.lines("fluxrt_step_seconds"))
        lines += _family("fluxrt_images_per_second", "gauge",
                         f"images completed per second over the last {IMAGES_PER_SECOND_WINDOW_S:g} s",
                         [f"fluxrt_images_per_second {images_per_s:.6g}"])
        lines += _family("fluxrt_replica_jobs_total", "counter", "jobs each replica (pipeline) took from the queue",
                         [f"fluxrt_replica_jobs_total{_labels(replica=i)} {n}" for i, n, _, _ in lanes])
        lines += _family("fluxrt_replica_jobs_running", "gauge", "jobs in each replica's running batch",
                         [f"fluxrt_replica_jobs_running{_labels(replica=i)} {n}" for i, _, n, _ in lanes])
        lines += _family("fluxrt_replica_up", "gauge", "1 while a replica can run jobs, 0 once its health check failed",
                         [f"fluxrt_replica_up{_labels(replica=i)} {int(up)}" for i, _, _, up in lanes])
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _replicas(pipes) -> list:
    """pipes as a list of replicas: one pipeline each (the same object twice would run one model's batches in turn
    behind two lanes), all of one model and mode (a request is checked against the first)."""
    if not isinstance(pipes, (list, tuple)):
        return [pipes]
    if not pipes:
        raise ValueError("an Engine needs at least one pipeline")
    if len({id(pipe) for pipe in pipes}) != len(pipes):
        raise ValueError("each replica needs its own pipeline (one per device); the same pipeline was given twice")
    first = pipes[0]
    for i, pipe in enumerate(pipes[1:], 1):
        if pipe.mode != first.mode or pipe.config != first.config or pipe.lora_hotswap != first.lora_hotswap:
            raise ValueError(f"replica {i} is not the model replica 0 is (config, mode or LoRA hot-swap differ): the "
                             "replicas of one engine must be the same model")
    return list(pipes)
