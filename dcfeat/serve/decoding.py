"""Decoding `dcfeat serve`'s images: `DecodePool` (threads, one per core plus one for small images, within a
budget of pixel memory; requests take turns, one image each) and `decode_all` (a request's images, checked
against that budget from their headers before any is decoded)."""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from dcfeat.images import ImageProblem, decode_cost
from dcfeat.localizer import Localizer
from dcfeat.serve.limits import ServeConfig
from dcfeat.serve.problems import Problem


# Images whose decoding takes at most this much pixel memory (a phone photo, JPEG-drafted to about 500x375,
# takes ~1.5 MB) have a decoding thread of their own besides the one per core, so that they never wait
# behind huge images.
SMALL_DECODE_BYTES = 8 << 20


class DecodePool:
    """Images decode in threads: at most one per core at a time plus one for small images, within
    `max_decode_bytes` of pixel memory (estimated from each image's header, `decode_cost`). Requests take
    turns, one image each, so that a request of many huge images cannot keep another's waiting until all of
    its own are done. Lives in the serving event loop (no locks): `run` is awaited there."""

    def __init__(self, slots: int, budget: int):
        self.slots, self.budget = slots, budget
        self.busy, self.small_busy, self.bytes = 0, False, 0
        self.waiting: OrderedDict[int, deque] = OrderedDict()  # request → its images' (cost, future), in turn
        self.executor = ThreadPoolExecutor(slots + 1, thread_name_prefix="dcfeat-decode")

    async def run(self, request: int, cost: int, work):
        # Others waiting go first, but a small image may take the small images' thread past them.
        lane = self._free_lane(cost) if not self.waiting or cost <= SMALL_DECODE_BYTES else None
        if lane is None:
            ready = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(request, deque()).append((cost, ready))
            try:
                lane = await ready
            except asyncio.CancelledError:
                if ready.done() and not ready.cancelled():  # granted as it was cancelled: hand the lane on
                    self._release(ready.result(), cost)
                else:
                    self._forget(request, ready)
                raise
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        finally:
            self._release(lane, cost)

    def _free_lane(self, cost: int) -> str | None:
        if cost <= SMALL_DECODE_BYTES and not self.small_busy:
            self.small_busy = True
            self.bytes += cost
            return "small"
        if self.busy < self.slots and (self.bytes + cost <= self.budget or self.busy == 0):
            self.busy += 1
            self.bytes += cost
            return "core"
        return None

    def _release(self, lane: str, cost: int) -> None:
        if lane == "small":
            self.small_busy = False
        else:
            self.busy -= 1
        self.bytes -= cost
        self._dispatch()

    def _forget(self, request: int, ready: asyncio.Future) -> None:
        waiting = self.waiting.get(request)
        if waiting is not None:
            self.waiting[request] = deque(w for w in waiting if w[1] is not ready)
            if not self.waiting[request]:
                del self.waiting[request]

    def _dispatch(self) -> None:
        """Grant free lanes to waiting images: the requests in turn, each its next image, the turn passing on."""
        while self.waiting:
            for request, waiting in self.waiting.items():
                lane = self._free_lane(waiting[0][0])
                if lane is not None:
                    break
            else:
                return
            _, ready = waiting.popleft()
            if waiting:
                self.waiting.move_to_end(request)
            else:
                del self.waiting[request]
            ready.set_result(lane)


async def decode_all(localizer: Localizer, parts: list[tuple[str, bytes | Image.Image]], config: ServeConfig,
                     pool: DecodePool, request: int) -> list[np.ndarray]:
    """Every image decoded in the pool's threads (`request` takes its turns there), once the pixel memory
    their headers say they take is checked against max_decode_bytes, each and together (413 before any is
    decoded); 422 naming each that cannot be decoded."""
    costs = await asyncio.gather(*(asyncio.to_thread(decode_cost, data, localizer.image_size, localizer.crop)
                                   for _, data in parts))
    budget = f"{config.max_decode_bytes / 2**20:,.0f} MB"
    over = [f"{name}: {what}, {cost / 2**20:,.0f} MB" for (name, _), (cost, what) in zip(parts, costs)
            if cost > config.max_decode_bytes]
    if over:
        raise Problem(413, "decode_budget", f"{len(over)} of {len(parts)} images would take more pixel memory to "
                      f"decode than this server gives all decoding at once ({budget}): " + "; ".join(over)
                      + ". Send them smaller (dcfeat serve --max-decode-mb)")
    total = sum(cost for cost, _ in costs)
    if total > config.max_decode_bytes:
        raise Problem(413, "decode_budget", f"the {len(parts)} images together would take {total / 2**20:,.0f} MB "
                      f"of pixel memory to decode, more than this server gives all decoding at once ({budget}); "
                      "send them in several requests (dcfeat serve --max-decode-mb)")

    def decode(data):
        if isinstance(data, bytes) and not data:
            raise ImageProblem("empty: 0 bytes")
        return localizer.decode(data, max_pixels=config.max_pixels)

    async def one(data, cost: int):
        try:
            return await pool.run(request, cost, functools.partial(decode, data))
        except ImageProblem as e:
            return e

    decoded = await asyncio.gather(*(one(data, cost) for (_, data), (cost, _) in zip(parts, costs)))
    bad = [f"{name}: {d}" for (name, _), d in zip(parts, decoded) if isinstance(d, ImageProblem)]
    if bad:
        raise Problem(422, "undecodable_image", f"{len(bad)} of {len(parts)} images cannot be used: "
                      + "; ".join(bad) + ". Send JPEG, PNG, WebP, TIFF or BMP files that open, each under "
                      f"{config.max_pixels:,} pixels")
    return decoded
