"""fluxrt.serve.engine in process: results as generate gives them alone, the queue bound, timeouts, cancellation,
graceful shutdown, a failing step, and the metrics' Prometheus text."""

import re
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

import fluxrt.serve.engine as engine_module
from fluxrt import GenerationRequest
from fluxrt.serve.engine import Engine, EngineDraining, EngineFailed, JobTimeout, QueueFull
from fluxrt.tiny import tiny_random_pipeline

SMALL = dict(width=64, height=64, num_steps=2)
WAIT_S = 60  # no test waits longer for anything: a hang fails instead of stalling the suite


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(progress=False)


@pytest.fixture
def make_engine(pipe):
    engines = []

    def make(**kwargs):
        engines.append(Engine(pipe, **kwargs).start())
        return engines[-1]

    yield make
    for engine in engines:
        assert engine.shutdown(drain=False, timeout_s=WAIT_S), "the engine's threads did not stop"


class Gate:
    """Holds the worker inside the transformer call (swapped on the pipeline instance) until opened."""

    def __init__(self, pipe):
        self.pipe, self.inner = pipe, pipe.transformer
        self.opened, self.entered = threading.Event(), threading.Event()

    def __enter__(self):
        self.pipe.transformer = self
        return self

    def __exit__(self, *exc):
        self.opened.set()
        self.pipe.transformer = self.inner

    def __call__(self, **kwargs):
        self.entered.set()
        assert self.opened.wait(WAIT_S), "the gate was never opened"
        return self.inner(**kwargs)

    def wait_entered(self):
        assert self.entered.wait(WAIT_S), "the worker never reached the transformer"


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def assert_as_alone(pipe, result, request: GenerationRequest) -> None:
    assert result.ok, result.error
    alone, = pipe.generate([request])
    assert result.request.seed == request.seed
    difference = np.abs(pixels(result.image) - pixels(alone.image)).max()
    assert difference <= 1, f"the engine's image differs from generate's alone by {difference} levels"


def metric(text: str, name: str, **labels) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    sample = name + (f"{{{label_text}}}" if labels else "")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("batching", ["step", "request", "serial"])
def test_each_result_is_the_request_alone(pipe, make_engine, batching):
    engine = make_engine(max_batch=3, batching=batching)
    requests = [GenerationRequest("a red star", seed=1, **SMALL),
                GenerationRequest("a blue circle", seed=2, guidance=5.0, **SMALL),
                GenerationRequest("a green square", width=64, height=64, num_steps=3, seed=3),
                GenerationRequest("a red star", width=48, height=64, num_steps=2, seed=4)]
    jobs = engine.submit_all(requests)
    for job, request in zip(jobs, requests):
        assert_as_alone(pipe, job.future.result(WAIT_S), request)


def test_a_drawn_seed_is_reported(pipe, make_engine):
    result = make_engine().submit(GenerationRequest("a cat", **SMALL)).future.result(WAIT_S)
    assert isinstance(result.request.seed, int)
    assert_as_alone(pipe, result, GenerationRequest("a cat", seed=result.request.seed, **SMALL))


def test_a_bad_request_is_refused_before_it_queues(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        engine.submit(GenerationRequest("a cat", width=65, height=64))
    with pytest.raises(ValueError, match="num_steps must be between 1 and 1000"):
        engine.submit_all([GenerationRequest("a cat", **SMALL), GenerationRequest("a cat", width=64, height=64,
                                                                                  num_steps=10**6)])
    assert metric(engine.metrics(), "fluxrt_queue_depth") == 0
    assert metric(engine.metrics(), "fluxrt_jobs_total", outcome="completed") == 0, "half a refused request ran"


def test_a_full_queue_refuses_all_or_nothing(pipe, make_engine):
    engine = make_engine(max_batch=1, max_queue=2, batching="serial")
    with Gate(pipe) as gate:
        running = engine.submit(GenerationRequest("held", seed=0, **SMALL))
        gate.wait_entered()
        queued = engine.submit(GenerationRequest("waits", seed=1, **SMALL))
        with pytest.raises(QueueFull, match="the queue is full") as err:
            engine.submit_all([GenerationRequest("two", seed=2, **SMALL), GenerationRequest("two", seed=3, **SMALL)])
        assert err.value.retry_after_s >= 1
        assert metric(engine.metrics(), "fluxrt_queue_depth") == 1, "a refused request left a job in the queue"
        last = engine.submit(GenerationRequest("fits", seed=4, **SMALL))
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest("over", seed=5, **SMALL))
        with pytest.raises(ValueError, match="never fit the queue of 2"):
            engine.submit_all([GenerationRequest("many", seed=s, **SMALL) for s in range(3)])
        gate.opened.set()
        for job in (running, queued, last):
            assert job.future.result(WAIT_S).ok


def test_a_timeout_fails_the_job_at_once_and_the_worker_goes_on(pipe, make_engine):
    engine = make_engine(max_batch=2, timeout_s=0.3)
    with Gate(pipe) as gate:
        held = engine.submit(GenerationRequest("held", seed=0, **SMALL))
        gate.wait_entered()
        queued = engine.submit(GenerationRequest("queued", seed=1, **SMALL))
        for job in (held, queued):  # while the worker is still inside the step
            assert isinstance(job.future.exception(timeout=5), JobTimeout)
    wait_until(lambda: metric(engine.metrics(), "fluxrt_jobs_running") == 0, "the timed-out job to leave the batch")
    after = GenerationRequest("after", seed=2, **SMALL)
    engine.timeout_s = WAIT_S
    assert_as_alone(pipe, engine.submit(after).future.result(WAIT_S), after)
    assert metric(engine.metrics(), "fluxrt_jobs_total", outcome="timeout") == 2


def test_cancel_a_queued_and_a_running_job(pipe, make_engine):
    engine = make_engine(max_batch=1, batching="step")
    with Gate(pipe) as gate:
        running = engine.submit(GenerationRequest("running", width=64, height=64, num_steps=4, seed=0))
        gate.wait_entered()
        queued = engine.submit(GenerationRequest("queued", seed=1, **SMALL))
        assert queued.cancel() and running.cancel()
        assert not queued.cancel(), "a cancelled job cancelled twice"
        for job in (queued, running):
            with pytest.raises(CancelledError):
                job.future.result(timeout=1)
        assert metric(engine.metrics(), "fluxrt_queue_depth") == 0
    wait_until(lambda: metric(engine.metrics(), "fluxrt_jobs_running") == 0, "the cancelled job to leave the batch")
    after = GenerationRequest("after", seed=2, **SMALL)
    assert_as_alone(pipe, engine.submit(after).future.result(WAIT_S), after)
    assert metric(engine.metrics(), "fluxrt_jobs_total", outcome="cancelled") == 2
    # the running job's first step, then the next job's two: the cancelled one ran none of its 3 other steps
    assert metric(engine.metrics(), "fluxrt_step_seconds_count") == 1 + 2
    assert metric(engine.metrics(), "fluxrt_batch_size_sum") == 1 + 2


def test_shutdown_finishes_what_was_accepted(pipe):
    engine = Engine(pipe, max_batch=2).start()
    requests = [GenerationRequest("drain", seed=s, **SMALL) for s in range(3)]
    jobs = engine.submit_all(requests)
    assert engine.shutdown(drain=True, timeout_s=WAIT_S), "the worker did not stop"
    for job, request in zip(jobs, requests):
        assert job.future.done(), "shutdown returned before a job was done"
        assert_as_alone(pipe, job.future.result(0), request)
    with pytest.raises(EngineDraining, match="shutting down"):
        engine.submit(requests[0])


def test_stop_accepting_keeps_the_accepted_jobs_running(pipe, make_engine):
    engine = make_engine()
    job = engine.submit(GenerationRequest("accepted", seed=0, **SMALL))
    engine.stop_accepting()
    assert not engine.accepting
    with pytest.raises(EngineDraining):
        engine.submit(GenerationRequest("late", seed=1, **SMALL))
    assert job.future.result(WAIT_S).ok


def test_shutdown_without_drain_cancels(pipe):
    engine = Engine(pipe, max_batch=1, batching="serial").start()
    with Gate(pipe) as gate:
        jobs = engine.submit_all([GenerationRequest("x", seed=s, **SMALL) for s in range(3)])
        gate.wait_entered()
        stopper = threading.Thread(target=engine.shutdown, kwargs=dict(drain=False))
        stopper.start()
        wait_until(lambda: all(job.future.done() for job in jobs), "the jobs to be cancelled")
        assert all(job.future.cancelled() for job in jobs)
    stopper.join(WAIT_S)
    assert not stopper.is_alive() and not engine.running


class FailsFirstStep:
    """A batcher whose first step raises (a bug, a lost device), then behaves."""

    def __init__(self, inner):
        self.inner, self.failed = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def step(self):
        if not self.failed:
            self.failed = True
            raise RuntimeError("the device fell off the bus")
        return self.inner.step()


def test_a_failing_step_fails_its_jobs_not_the_worker(pipe, make_engine, monkeypatch):
    real = engine_module.make_batcher
    monkeypatch.setattr(engine_module, "make_batcher", lambda *args: FailsFirstStep(real(*args)))
    engine = make_engine(max_batch=2)
    first = engine.submit_all([GenerationRequest("a", seed=0, **SMALL), GenerationRequest("b", seed=1, **SMALL)])
    for job in first:
        result = job.future.result(WAIT_S)
        assert not result.ok and "RuntimeError: the device fell off the bus" in result.error
    after = GenerationRequest("after", seed=2, **SMALL)
    assert_as_alone(pipe, engine.submit(after).future.result(WAIT_S), after)
    assert engine.running
    assert metric(engine.metrics(), "fluxrt_jobs_total", outcome="failed") == 2


SAMPLE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? -?[0-9.e+-]+|[+-]Inf|NaN')
COMMENT = re.compile(r"# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                     r"(counter|gauge|histogram|summary|untyped))")


def test_metrics_are_prometheus_text(pipe, make_engine):
    engine = make_engine(max_batch=4)
    jobs = engine.submit_all([GenerationRequest("m", seed=s, **SMALL) for s in range(3)])
    for job in jobs:
        job.future.result(WAIT_S)
    engine.stats.count_request('/a "quoted" \\ path', 200)  # label values are escaped
    text = engine.metrics()
    assert text.endswith("\n")
    for line in text.splitlines():
        assert COMMENT.fullmatch(line) or SAMPLE.fullmatch(line), f"not Prometheus text format: {line!r}"
    assert metric(text, "fluxrt_jobs_total", outcome="completed") == 3
    steps = metric(text, "fluxrt_step_seconds_count")
    assert steps >= 2, "two denoising steps at least"
    assert metric(text, "fluxrt_batch_size_count") == steps
    assert metric(text, "fluxrt_batch_size_sum") == 3 * 2, "3 rows in each of the 2 steps"
    assert metric(text, "fluxrt_batch_size_bucket", le="+Inf") == steps
    assert metric(text, "fluxrt_images_per_second") > 0
    assert metric(text, "fluxrt_queue_depth") == 0


def test_engine_arguments_are_checked(pipe):
    with pytest.raises(ValueError, match="batching must be one of"):
        Engine(pipe, batching="fastest")
    with pytest.raises(ValueError, match="max_queue must be a positive int"):
        Engine(pipe, max_queue=0)
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        Engine(pipe, timeout_s=-1)
    with pytest.raises(EngineDraining):
        Engine(pipe).submit(GenerationRequest("not started", **SMALL))


class AdmitsNothing(FailsFirstStep):
    def admits(self, request):
        return False


def test_a_batcher_that_admits_nothing_fails_the_job_instead_of_spinning(pipe, make_engine, monkeypatch):
    real = engine_module.make_batcher
    monkeypatch.setattr(engine_module, "make_batcher", lambda *args: AdmitsNothing(real(*args)))
    result = make_engine().submit(GenerationRequest("never", seed=0, **SMALL)).future.result(WAIT_S)
    assert not result.ok and "cannot run this request" in result.error


# ---- replicas: one queue, one lane (batcher + worker) per pipeline ----


@pytest.fixture(scope="module")
def replica():
    return tiny_random_pipeline(progress=False)  # seeded: the same weights as `pipe`, a second copy


@pytest.fixture
def make_replicated(pipe, replica):
    engines = []

    def make(**kwargs):
        engines.append(Engine([pipe, replica], **kwargs).start())
        return engines[-1]

    yield make
    for engine in engines:
        assert engine.shutdown(drain=False, timeout_s=WAIT_S), "the engine's threads did not stop"


class Turnstile:
    """Holds each transformer call of one pipeline (swapped on the instance) until the test lets it through: a lane
    stepped one call at a time. error: raised by the calls let through (a broken device or group)."""

    def __init__(self, pipe):
        self.pipe, self.inner = pipe, pipe.transformer
        self.passes, self.calls, self.error = threading.Semaphore(0), 0, None

    def __enter__(self):
        self.pipe.transformer = self
        return self

    def __exit__(self, *exc):
        self.pipe.transformer = self.inner
        self.passes.release(10_000)

    def __call__(self, **kwargs):
        self.calls += 1
        assert self.passes.acquire(timeout=WAIT_S), "the turnstile was never opened"
        if self.error is not None:
            raise self.error
        return self.inner(**kwargs)

    def let_through(self, calls: int = 1) -> None:
        self.passes.release(calls)

    def wait_calls(self, calls: int) -> None:
        wait_until(lambda: self.calls >= calls, f"{calls} transformer calls")


def per_replica(engine, name: str) -> list[float]:
    text = engine.metrics()
    return [metric(text, name, replica=i) for i in range(2)]


def test_an_idle_replica_takes_a_job_before_a_busy_batch_grows(pipe, replica, make_replicated):
    engine = make_replicated(max_batch=4, batching="step")
    requests = [GenerationRequest(f"job {k}", width=64, height=64, num_steps=3, seed=k) for k in range(3)]
    with Turnstile(pipe) as first, Turnstile(replica) as second:
        jobs = engine.submit_all(requests[:2])  # both lanes idle: one job each, not both in one batch
        wait_until(lambda: sum(per_replica(engine, "fluxrt_replica_jobs_running")) == 2, "both jobs to run")
        assert per_replica(engine, "fluxrt_replica_jobs_running") == [1, 1]
        first.wait_calls(1)
        second.wait_calls(1)
        assert sorted(job.replica for job in jobs) == [0, 1]
        jobs.append(engine.submit(requests[2]))  # no lane idle: the first to reach a step boundary takes it
        first.let_through()
        first.wait_calls(2)
        assert per_replica(engine, "fluxrt_replica_jobs_running") == [2, 1], "a busy lane with no idle one " \
                                                                             "did not admit"
        assert jobs[2].replica == 0 and metric(engine.metrics(), "fluxrt_queue_depth") == 0
        first.let_through(100)
        second.let_through(100)
        for job, request in zip(jobs, requests):
            assert_as_alone(pipe, job.future.result(WAIT_S), request)
    assert per_replica(engine, "fluxrt_replica_jobs_total") == [2, 1]


def test_cancel_and_timeout_reach_the_replica_that_runs_the_job(pipe, replica, make_replicated):
    engine = make_replicated(max_batch=2, batching="step")
    with Turnstile(pipe) as first, Turnstile(replica) as second:
        jobs = engine.submit_all([GenerationRequest(f"job {k}", seed=k, **SMALL) for k in range(2)])
        first.wait_calls(1)
        second.wait_calls(1)
        on_second = next(job for job in jobs if job.replica == 1)
        assert on_second.cancel()
        second.let_through()  # the step boundary at which lane 1 lets the cancelled job go
        wait_until(lambda: per_replica(engine, "fluxrt_replica_jobs_running")[1] == 0, "lane 1 to drop its job")
        engine.timeout_s = 0.3
        late = engine.submit(GenerationRequest("times out", seed=5, **SMALL))
        second.wait_calls(2)
        assert late.replica == 1, "the idle lane did not take the job"
        assert isinstance(late.future.exception(timeout=5), JobTimeout)
        second.let_through()
        wait_until(lambda: per_replica(engine, "fluxrt_replica_jobs_running")[1] == 0, "lane 1 to drop its job")
        assert second.calls == 2, "lane 1 kept running a cancelled or timed-out job"
        assert per_replica(engine, "fluxrt_replica_jobs_running")[0] == 1, "lane 0's job was dropped instead"
    on_first = next(job for job in jobs if job.replica == 0)
    assert on_first.future.result(WAIT_S).ok
    text = engine.metrics()
    assert metric(text, "fluxrt_jobs_total", outcome="cancelled") == 1
    assert metric(text, "fluxrt_jobs_total", outcome="timeout") == 1


def test_shutdown_drains_every_replica(pipe, replica):
    engine = Engine([pipe, replica], max_batch=1, batching="serial").start()
    requests = [GenerationRequest("drain", seed=s, **SMALL) for s in range(5)]
    jobs = engine.submit_all(requests)
    assert engine.shutdown(drain=True, timeout_s=WAIT_S), "a worker did not stop"
    for job, request in zip(jobs, requests):
        assert job.future.done(), "shutdown returned before a job was done"
        assert_as_alone(pipe, job.future.result(0), request)
    assert all(n >= 1 for n in per_replica(engine, "fluxrt_replica_jobs_total")), "a replica ran nothing"
    assert not engine.running


def test_a_replica_whose_health_check_fails_takes_no_more_jobs(pipe, replica, make_replicated):
    broken: dict[int, str] = {}
    engine = make_replicated(max_batch=1, batching="serial", health_check=lambda p: broken.get(id(p)))
    with Turnstile(pipe) as first, Turnstile(replica) as second:
        jobs = engine.submit_all([GenerationRequest(f"job {k}", seed=k, **SMALL) for k in range(2)])
        first.wait_calls(1)
        second.wait_calls(1)
        broken[id(replica)] = "replica 1 lost its group"
        second.error = RuntimeError("a peer died")
        second.let_through(10)
        failed = next(job for job in jobs if job.replica == 1).future.result(WAIT_S)
        assert failed.error == "replica 1 lost its group", "the failed job does not say why"
        assert engine.accepting and engine.failure is None, "one replica down is not the engine down"
        assert per_replica(engine, "fluxrt_replica_up") == [1, 0]
        queued = engine.submit(GenerationRequest("after", seed=2, **SMALL))
        first.let_through(100)
        assert queued.future.result(WAIT_S).ok and queued.replica == 0, "the failed replica took a job"
        broken[id(pipe)] = "replica 0 lost its group"
        last, waiting = engine.submit_all([GenerationRequest(f"last {k}", seed=k, **SMALL) for k in range(2)])
        assert last.future.result(WAIT_S).ok  # its step ran; the health check fails after it
        assert waiting.future.result(WAIT_S).error == "replica 0 lost its group", "a queued job was left waiting"
    assert not engine.accepting and "every replica failed" in engine.failure
    with pytest.raises(EngineFailed, match="cannot run requests any more: every replica failed: replica 0: replica 0"):
        engine.submit(GenerationRequest("refused", seed=9, **SMALL))
    assert per_replica(engine, "fluxrt_replica_up") == [0, 0]


def test_replicas_must_be_separate_pipelines_of_one_model(pipe):
    with pytest.raises(ValueError, match="the same pipeline was given twice"):
        Engine([pipe, pipe])
    with pytest.raises(ValueError, match="at least one pipeline"):
        Engine([])
    other = tiny_random_pipeline(progress=False, mode="fill")
    with pytest.raises(ValueError, match="replica 1 is not the model replica 0 is"):
        Engine([pipe, other])
