"""The engine on a thread of its own, fed from asyncio: requests go in through an inbox, events come back on
each request's asyncio queue. The engine itself stays single-threaded and knows nothing of this.

Across ranks (a model split over processes, see parallel.py) every rank runs the same engine: rank 0's
runner sends each batch of inbox operations (requests as specs, cancellations) to the others before
applying it, and `follow` applies them on the other ranks, so every engine takes the same steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..generation.batch import Engine, Event, Request
from ..parallel import share_json

log = logging.getLogger("mlx_qwen2.server")


class QueueFull(Exception):
    """More sequences asked for than running and waiting places allow."""


class EngineRunner:
    """Run `engine` on a thread; at most `capacity` sequences running or waiting at once."""

    def __init__(
        self,
        make_engine: Callable[[], Engine],
        capacity: int,
        build: Callable[[Any], Request],
        group: Any = None,
    ):
        self.make_engine = make_engine
        self.engine = make_engine()
        self.capacity = capacity
        self.build = build  # a request spec -> the engine's Request
        self.group = group  # with other ranks: the mx.distributed group they follow over
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._outputs: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event | BaseException]]] = {}
        self._lock = threading.Lock()
        self._active = 0  # sequences submitted and not yet finished or cancelled
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sent: list[list[Any]] = []  # the operations applied since the other ranks last heard
        self.on_step: Callable[[Engine], None] | None = None

    @property
    def active(self) -> int:
        return self._active

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlx_qwen2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is running and waiting, then end the thread."""
        self._stopping.set()
        self._inbox.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, requests: list[Any], output: asyncio.Queue[Event | BaseException]) -> None:
        """Queue these sequences (specs: all or none); their events go to `output`. QueueFull when there is
        no room."""
        with self._lock:
            if self._active + len(requests) > self.capacity:
                raise QueueFull(f"{self._active} sequences running or waiting, at most {self.capacity}")
            self._active += len(requests)
        loop = asyncio.get_running_loop()
        for r in requests:
            self._inbox.put(("add", r, (loop, output)))

    def cancel(self, ids: list[Any]) -> None:
        """Stop these sequences (if still going) at the engine's next step; no events follow."""
        for i in ids:
            self._inbox.put(("cancel", i, None))

    def _loop(self) -> None:
        while True:
            self._drain(block=not self.engine.busy)
            if self.group is not None:  # the other ranks take this step too
                share_json(self.group, {"stop": self._stopping.is_set(), "ops": self._sent})
                self._sent = []
            if self._stopping.is_set():
                self._fail_all(asyncio.CancelledError("the server is shutting down"))
                log.info("engine stopped")
                return
            if not self.engine.busy:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug: fail what was running, keep serving with a fresh engine
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for event in events:
                self._deliver(event)
            if self.on_step is not None:
                self.on_step(self.engine)

    def _drain(self, block: bool) -> None:
        """Apply what the inbox holds; wait for something first when the engine is idle."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value, output = item
            if kind == "add":
                self._sent.append(["add", value.to_json()])
                self._add(self.build(value), output)
            elif kind == "cancel" and value in self._outputs:
                self._sent.append(["cancel", list(value)])
                self.engine.cancel(value)
                self._finished(value)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, request: Request, output: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]) -> None:
        self._outputs[request.id] = output
        try:
            self.engine.add(request)
        except Exception as e:  # the routes check prompts first, so this is unexpected; the caller reports it
            self._put(request.id, e)
            self._finished(request.id)

    def _deliver(self, event: Event) -> None:
        if event.id not in self._outputs:
            return  # cancelled after this step began
        self._put(event.id, event)
        if event.finish_reason is not None:
            self._finished(event.id)

    def _put(self, id_: Any, item: Event | BaseException) -> None:
        loop, output = self._outputs[id_]
        try:
            loop.call_soon_threadsafe(output.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown)
            pass

    def _finished(self, id_: Any) -> None:
        del self._outputs[id_]
        with self._lock:
            self._active -= 1

    def _fail_all(self, error: BaseException) -> None:
        for id_ in list(self._outputs):
            self.engine.cancel(id_)
            self._put(id_, error)
            self._finished(id_)
        self.engine = self.make_engine() if not self._stopping.is_set() else self.engine


def follow(make_engine: Callable[[], Engine], build: Callable[[dict[str, Any]], Request], group: Any) -> None:
    """On a rank other than 0: apply rank 0's operations and take the same engine steps, until it stops."""
    engine = make_engine()
    while True:
        batch = share_json(group, None)
        for kind, value in batch["ops"]:
            if kind == "cancel":
                engine.cancel(tuple(value))
                continue
            try:
                engine.add(build(value))
            except Exception:  # as on rank 0, which reports it to the client
                log.exception("adding a request failed")
        if batch["stop"]:
            log.info("engine stopped")
            return
        if engine.busy:
            try:
                engine.step()
            except Exception:  # rank 0 fails the same step and starts a fresh engine: so does this one
                log.exception("engine step failed")
                engine = make_engine()
