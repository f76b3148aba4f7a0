"""One asyncio event loop in one daemon thread: how synchronous code (the control loop, a CLI, a web server's
workers) drives asyncio clients such as nats-py without blocking on them.

Two ways to run it:
- :meth:`LoopThread.start` with a coroutine, a service's main: it runs until it returns, normally once
  :attr:`LoopThread.stopping` is set (by :meth:`LoopThread.stop`); tasks it leaves behind (a client library's
  heartbeats) are cancelled when it returns, as ``asyncio.run`` would;
- :meth:`LoopThread.start` without one: the loop runs until :meth:`LoopThread.stop`, and work is handed in
  from other threads with :meth:`LoopThread.call` and :meth:`LoopThread.run`.

:meth:`LoopThread.stop`, from any other thread, ends either, joins the thread and closes the loop; a thread
that does not end in time (a wedged client library) is left to die with the process, its loop left open.
Pure asyncio and threading: no network library here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["LoopThread"]

logger = logging.getLogger(__name__)


async def _cancel_others() -> None:
    """Cancel every task of the running loop but the caller's, and wait until they have ended."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


class LoopThread:
    """An asyncio loop in a daemon thread named ``name`` (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()  # bound to self.loop when first awaited there
        self._thread: threading.Thread | None = None
        self._forever = False

    def start(self, main: Coroutine[Any, Any, Any] | None = None) -> LoopThread:
        """Run ``main`` in the thread (None: run the loop until :meth:`stop`)."""
        if self._thread is not None:
            raise RuntimeError(f"loop thread {self.name} already started")
        self._forever = main is None

        async def until_done(coro: Coroutine[Any, Any, Any]) -> None:
            try:
                await coro
            finally:
                await _cancel_others()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            if main is None:
                self.loop.run_forever()
            else:
                self.loop.run_until_complete(until_done(main))

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def running(self) -> bool:
        """Whether the thread is alive (its loop may still be starting)."""
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the loop, soon (from any thread)."""
        self.loop.call_soon_threadsafe(fn)

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result (TimeoutError after ``timeout_s``)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """End the loop's work (set :attr:`stopping`; without a main, cancel its tasks and stop it), join the
        thread for up to ``timeout_s`` and close the loop. False when the thread did not end in time."""
        thread = self._thread
        if thread is None:
            return True
        if thread.is_alive() and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stopping.set)
            if self._forever:
                try:
                    self.run(_cancel_others(), timeout_s)
                except TimeoutError:
                    logger.warning("%s: tasks not cancelled within %g s", self.name, timeout_s)
                finally:
                    self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():  # pragma: no cover - a wedged client library; the daemon thread dies with us
            logger.warning("%s did not stop within %g s", self.name, timeout_s)
            return False
        self.loop.close()
        self._thread = None
        return True
