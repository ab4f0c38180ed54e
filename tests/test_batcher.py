"""The micro-batching worker of `dcfeat serve` without HTTP: which queued jobs share a forward pass, the
bounded queue, and that each job gets its own answers (descriptor jobs on the tiny calibrated run: no
backbone runs)."""

import asyncio

import numpy as np
import polars as pl
import pytest

from dcfeat.localizer import Localizer
from dcfeat.serve import Batcher, Job, Metrics, QueueFull, ServeConfig


class Recording:
    """The run's Localizer, recording the rows of every classifier pass the worker asks of it."""

    def __init__(self, localizer: Localizer):
        self.localizer, self.passes = localizer, []

    def __getattr__(self, name):
        return getattr(self.localizer, name)

    def scores(self, features, k):
        self.passes.append((len(features), k))
        return self.localizer.scores(features, k)


@pytest.fixture(scope="module")
def localizer(calibrated_run) -> Localizer:
    return Localizer.from_run(calibrated_run, device="cpu")


def features(localizer: Localizer, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, localizer.dim)).astype(np.float32)


def run_jobs(batcher: Batcher, specs: list[tuple[int, int, float | None]], localizer: Localizer
             ) -> tuple[list[Job], list]:
    """Queue one descriptor job per (rows, k, min_confidence), all before the worker starts (so that the
    batches they form do not depend on timing), then start it and wait for every answer."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job([], [f"{i}.{r}" for r in range(n)], k, p, loop.create_future(), loop,
                    features=features(localizer, n, seed=i)) for i, (n, k, p) in enumerate(specs)]
        for job in jobs:
            batcher.submit(job)
        batcher.start()
        try:
            return jobs, await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), timeout=120)
        finally:
            batcher.stop()

    return asyncio.run(main())


def test_queued_jobs_share_forward_passes_up_to_max_batch_and_each_gets_its_own_answers(localizer):
    recording, metrics = Recording(localizer), Metrics()
    batcher = Batcher(recording, ServeConfig(max_batch=4, max_wait_ms=60_000), metrics)
    # 3 rows fill most of a batch; the next job (2) would overflow it, so it opens the next batch, which
    # the third (2) fills: two passes of 3 and 4 rows, neither waiting its max_wait for more.
    jobs, found = run_jobs(batcher, [(3, 5, None), (2, 5, None), (2, 5, None)], localizer)
    assert recording.passes == [(3, 5), (4, 5)]
    assert metrics.batch_sizes.count == 2 and metrics.batch_sizes.sum == 7 and metrics.queue_depth == 0
    for job, answers in zip(jobs, found):
        alone = localizer.locate_features(job.features, ids=job.ids, k=5)
        assert [a.image_id for a in answers] == job.ids
        assert [[c["class"] for c in a.top_k] for a in answers] == [[c["class"] for c in a.top_k] for a in alone]


def test_a_job_arriving_within_max_wait_joins_the_waiting_one(localizer):
    recording = Recording(localizer)
    batcher = Batcher(recording, ServeConfig(max_batch=4, max_wait_ms=60_000), Metrics())

    async def main():
        loop = asyncio.get_running_loop()
        first, second = (Job([], [f"{i}.0", f"{i}.1"], 3, None, loop.create_future(), loop,
                             features=features(localizer, 2, seed=i)) for i in range(2))
        batcher.start()
        try:
            batcher.submit(first)  # taken by the worker, which waits for more (up to a minute) ...
            await asyncio.sleep(0.2)
            assert not first.future.done()
            batcher.submit(second)  # ... and this one fills the batch: one pass for both, at once
            return await asyncio.wait_for(asyncio.gather(first.future, second.future), timeout=120)
        finally:
            batcher.stop()

    a, b = asyncio.run(main())
    assert recording.passes == [(4, 3)] and [x.image_id for x in a + b] == ["0.0", "0.1", "1.0", "1.1"]


def test_one_batch_answers_each_job_with_its_own_k_and_min_confidence(localizer):
    recording = Recording(localizer)
    batcher = Batcher(recording, ServeConfig(max_batch=8, max_wait_ms=0), Metrics())
    _, (few, many, strict) = run_jobs(batcher, [(2, 1, None), (1, 4, None), (1, 4, 1.0)], localizer)
    assert recording.passes == [(4, 4)]  # one classifier pass for the batch, at its largest k
    assert [len(a.top_k) for a in few + many + strict] == [1, 1, 4, 4]
    assert [a.abstained for a in few + many + strict] == [False, False, False, True]
    assert strict[0].confidence < 1.0


def test_a_full_queue_refuses_the_job_that_would_overflow_it(localizer):
    metrics = Metrics()
    batcher = Batcher(localizer, ServeConfig(max_queue=4, max_wait_ms=0), metrics)
    loop = asyncio.new_event_loop()
    try:
        def job(n):
            return Job([], ["x"] * n, 3, None, loop.create_future(), loop, features=features(localizer, n, seed=n))

        batcher.submit(job(3))
        with pytest.raises(QueueFull):
            batcher.submit(job(2))
        assert metrics.queue_depth == 3  # the refused job took no place
        batcher.submit(job(1))
        assert metrics.queue_depth == 4
    finally:
        loop.close()


def test_an_abandoned_job_is_dropped_from_its_batch(localizer):
    recording = Recording(localizer)
    batcher = Batcher(recording, ServeConfig(max_batch=8, max_wait_ms=0), Metrics())

    async def main():
        loop = asyncio.get_running_loop()
        gone, kept = (Job([], [f"{i}"], 3, None, loop.create_future(), loop, features=features(localizer, 1, seed=i))
                      for i in range(2))
        gone.abandoned.set()  # its request timed out or went away while it was queued
        batcher.submit(gone)
        batcher.submit(kept)
        batcher.start()
        try:
            return gone, await asyncio.wait_for(kept.future, timeout=120)
        finally:
            batcher.stop()

    gone, kept = asyncio.run(main())
    assert recording.passes == [(1, 3)] and kept[0].image_id == "1" and not gone.future.done()


def test_a_scoring_pass_at_a_larger_k_answers_a_smaller_k_as_its_own_pass(localizer):
    x, ids = features(localizer, 6, seed=3), [str(i) for i in range(6)]
    for k in (1, 4, 20, 25):
        own = localizer.table(x, ids, k=k)
        for larger in (k, 30):
            shared = localizer.table(x[2:], ids[2:], k=k, scores=localizer.scores(x, larger).rows(np.arange(2, 6)))
            assert shared.equals(own.filter(pl.col("image_id").is_in(ids[2:])))
