"""The engine on a thread of its own, fed from asyncio: requests go in through an inbox, events come back on
each request's asyncio queue. The engine itself stays single-threaded and knows nothing of this.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..generation.batch import Engine, Event, Request

log = logging.getLogger("mlx_qwen2.server")


class QueueFull(Exception):
    """More sequences asked for than running and waiting places allow."""


class EngineRunner:
    """Run `engine` on a thread; at most `capacity` sequences running or waiting at once."""

    def __init__(self, make_engine: Callable[[], Engine], capacity: int):
        self.make_engine = make_engine
        self.engine = make_engine()
        self.capacity = capacity
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._outputs: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event | BaseException]]] = {}
        self._lock = threading.Lock()
        self._active = 0  # sequences submitted and not yet finished or cancelled
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
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

    def submit(self, requests: list[Request], output: asyncio.Queue[Event | BaseException]) -> None:
        """Queue these sequences (all or none); their events go to `output`. QueueFull when there is no room."""
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
                self._add(value, output)
            elif kind == "cancel" and value in self._outputs:
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
