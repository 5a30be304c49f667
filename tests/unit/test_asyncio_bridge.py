"""The asyncio loop thread that nats-py runs on, seen from trio: results, errors,
cancellation both ways, and a clean exit (no thread, no pending task left)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from pipeline.asyncio_bridge import open_asyncio_thread


async def test_a_coroutine_runs_on_the_loop_thread_and_its_result_comes_back() -> None:
    async def where() -> tuple[str, bool]:
        await asyncio.sleep(0.01)
        return threading.current_thread().name, asyncio.get_running_loop().is_running()

    async with open_asyncio_thread("bridge-test") as thread:
        assert await thread.run(where()) == ("bridge-test", True)
    assert not any(t.name == "bridge-test" for t in threading.enumerate())


async def test_an_exception_is_raised_in_the_trio_caller() -> None:
    async def fail() -> None:
        raise KeyError("nope")

    async with open_asyncio_thread("bridge-test") as thread:
        with pytest.raises(KeyError, match="nope"):
            await thread.run(fail())


async def test_cancelling_the_trio_caller_cancels_the_asyncio_task() -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with open_asyncio_thread("bridge-test") as thread:
        with trio.move_on_after(0.05):
            await thread.run(forever())
        await trio.to_thread.run_sync(cancelled.wait, 5)
    assert cancelled.is_set()


async def test_tasks_left_on_the_loop_are_cancelled_on_the_way_out() -> None:
    stopped = threading.Event()

    async def background() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    async def start() -> None:
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)

    async with open_asyncio_thread("bridge-test") as thread:
        await thread.run(start())
    assert stopped.is_set()
    assert thread.loop.is_closed()
