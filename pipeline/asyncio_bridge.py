"""An asyncio event loop in a dedicated thread, for asyncio-only clients (nats-py) from trio.

One daemon thread runs an asyncio loop for the life of its owner (the JetStream sink,
the fleet-policy agent). Trio code hands it a coroutine with :meth:`AsyncioThread.run`
and waits without blocking trio's loop: the coroutine is scheduled with
``asyncio.run_coroutine_threadsafe``, and its completion wakes the waiting trio task
through the trio token (``run_sync_soon``), not through a worker thread per call.
Cancelling the trio caller (a breaker's ``stage_timeout_s``, a shutdown) cancels the
asyncio task too, and the trio task returns at once without waiting for it.

    async with open_asyncio_thread("bpfpipe-fleet") as loop_thread:
        value = await loop_thread.run(client.get("global"))

Why a thread and not trio-asyncio: trio-asyncio runs asyncio callbacks *inside* trio's
loop and depends on both libraries' internals (its releases trail trio's), it adds a
dependency and a loop mode to the whole process, and every callback the client runs
(its read loop, flusher, ping timer, a key-value watcher) would then run in the
pipeline's loop. A loop in a thread keeps the client as its authors run it, and nothing
of it is touched from the trio thread; the cost is one wake-up per call, which is why
callers hand it a whole batch's work at once rather than one message at a time.

On the way out (:meth:`AsyncioThread.stop`) the loop's remaining tasks are cancelled,
async generators finalised, the loop closed and the thread joined.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

__all__ = ["AsyncioThread", "open_asyncio_thread"]

T = TypeVar("T")


class AsyncioThread:
    """One asyncio loop running in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str = "asyncio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and return its result (or raise its error)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the trio run is over: nobody waits
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            if not future.done():
                future.cancel()
        return future.result()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs, close the loop, join the thread (blocking; idempotent)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)


@asynccontextmanager
async def open_asyncio_thread(name: str) -> AsyncIterator[AsyncioThread]:
    """An :class:`AsyncioThread` for the duration of the block."""
    thread = AsyncioThread(name)
    try:
        yield thread
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.stop)
