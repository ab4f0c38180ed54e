"""The micro-batching worker of `dcfeat serve`: one thread owns the model; requests queue their queries as a
`Job` (decoded images, or descriptors that skip the backbone) in a queue bounded in images (`QueueFull`
beyond it); the worker takes the first waiting job and, within `max_wait_ms` of it, every other that fits
`max_batch` queries, runs one forward pass for them all and answers each job's future on its event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from dcfeat.localizer import Answer, Localizer, answers
from dcfeat.serve.limits import ServeConfig
from dcfeat.serve.metrics import Metrics


@dataclass
class Job:
    """One request's queries: decoded images for the backbone, or descriptors (`features`) that skip it."""

    images: list[np.ndarray]
    ids: list[str]
    k: int
    min_confidence: float | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abandoned: threading.Event = field(default_factory=threading.Event)  # its request timed out or went away
    features: np.ndarray | None = None  # (n, dim) float32 descriptors, instead of images

    @property
    def size(self) -> int:
        """Queries in the job: what the queue and a batch count."""
        return len(self.features) if self.features is not None else len(self.images)


class QueueFull(Exception):
    pass


class Batcher:
    """Micro-batching: requests arriving within `max_wait_ms` of each other share one forward pass."""

    def __init__(self, localizer: Localizer, config: ServeConfig, metrics: Metrics):
        self.localizer, self.config, self.metrics = localizer, config, metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0  # images queued, not yet taken by the worker
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.alive:
            self._thread = threading.Thread(target=self._loop, name="dcfeat-model", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self.alive:
            self._queue.put(None)
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job, or QueueFull when its images would overflow the bounded queue."""
        with self._lock:
            if self._pending + job.size > self.config.max_queue:
                raise QueueFull
            self._pending += job.size
            self.metrics.queue_depth = self._pending
        self._queue.put(job)

    def _taken(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.queue_depth = self._pending

    def _loop(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                return
            batch, n = [job], job.size
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while n < self.config.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                if n + nxt.size > self.config.max_batch:
                    carry = nxt  # the next batch's first
                    break
                batch.append(nxt)
                n += nxt.size
            self._taken(n)
            self._answer([j for j in batch if not j.abandoned.is_set()])

    def _answer(self, batch: list[Job]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        try:
            feats = self._features(batch)
            offsets = np.cumsum([0] + [job.size for job in batch])
            results = {}
            scores = self.localizer.scores(feats, max(job.k for job in batch))  # one classifier pass per batch
            for k in sorted({job.k for job in batch}):  # each k answered from it
                rows = [i for i, job in enumerate(batch) if job.k == k]
                index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in rows])
                ids = [f"{i}:{j}" for i in rows for j in range(batch[i].size)]
                found = answers(self.localizer.table(feats[index], ids, k=k, scores=scores.rows(index)))
                for i in rows:
                    results[i] = found[:batch[i].size]
                    found = found[batch[i].size:]
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure, the worker goes on
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, e)
            return
        seconds = time.perf_counter() - start
        with self.metrics.lock:
            self.metrics.batch_sizes.observe(len(feats))
            self.metrics.forward.observe(seconds)
        for i, job in enumerate(batch):
            own = [_renamed(a, name, job.min_confidence) for a, name in zip(results[i], job.ids)]
            job.loop.call_soon_threadsafe(_settle, job.future, own, None)

    def _features(self, batch: list[Job]) -> np.ndarray:
        """The batch's features in job order: its images through the backbone (one forward pass per
        max_batch of them), its descriptors as they came."""
        images = [im for job in batch if job.features is None for im in job.images]
        embedded = (np.concatenate([self.localizer.embed(images[s:s + self.config.max_batch])
                                    for s in range(0, len(images), self.config.max_batch)]) if images else None)
        parts, at = [], 0
        for job in batch:
            if job.features is not None:
                parts.append(job.features)
            else:
                parts.append(embedded[at:at + len(job.images)])
                at += len(job.images)
        return np.concatenate(parts)


def _renamed(answer: Answer, image_id: str, min_confidence: float | None) -> Answer:
    """An answer of a batch under its request's own image name and abstention threshold."""
    abstained = min_confidence is not None and answer.confidence is not None and answer.confidence < min_confidence
    return replace(answer, image_id=image_id, abstained=abstained)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
