"""Spool replay: the pure bookkeeping (which index entries are pending, how they group),
and the breaker replaying its spool through a primary that can take spooled batches back,
in order, before new batches, without a second outcome in the ledger."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline import Batch, BatchSink, NodeSpec, Pipeline
from pipeline.testing import TestingSource, TestingSourceConfig, make_batch, settings
from stages.breaker import CircuitBreakerConfig, CircuitBreakerSink
from stages.spool_replay import (
    IndexEntry,
    SpooledBatch,
    SpoolReplayFiles,
    encode_entry,
    pending_entries,
    replay_groups,
)


def entry(seq: int, events: int = 10, start: int = 0) -> IndexEntry:
    return IndexEntry("run", "src", seq, "ev", events, start, start + events)


def test_pending_entries_start_after_the_position_and_skip_a_torn_line() -> None:
    lines = [encode_entry(entry(i)) for i in range(3)]
    index = b"".join(lines)
    assert [e.seq for e, _ in pending_entries(index, 0)] == [0, 1, 2]
    first_end = len(lines[0])
    pending = pending_entries(index, first_end)
    assert [e.seq for e, _ in pending] == [1, 2]
    assert pending[-1][1] == len(index)  # the position to persist after the last one
    assert pending_entries(index + b'{"run":"r"', 0)[-1][0].seq == 2  # a torn last line is not an entry yet
    assert pending_entries(index, len(index) + 100) == []  # a stale position: nothing pending


def test_replay_groups_bound_events_and_batches_and_keep_order() -> None:
    items = [(entry(i, events=40), i) for i in range(7)]
    groups = replay_groups(items, max_events=100, max_batches=10)
    assert [[e.seq for e, _ in g] for g in groups] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [len(g) for g in replay_groups(items, max_events=10_000, max_batches=3)] == [3, 3, 1]
    big = [(entry(0, events=500), 0), (entry(1, events=5), 1)]
    assert [len(g) for g in replay_groups(big, max_events=100, max_batches=10)] == [1, 1]


def test_replay_files_resume_from_the_persisted_position(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b'{"v":0}\n{"v":1}\n{"v":2}\n')
    files = SpoolReplayFiles(str(spool))
    files.index.write_bytes(
        encode_entry(IndexEntry("r", "s", 0, "e", 1, 0, 8))
        + encode_entry(IndexEntry("r", "s", 1, "e", 2, 8, 24))
    )
    pending = files.pending()
    assert [e.seq for e, _ in pending] == [0, 1]
    files.mark_replayed(pending[0][1])
    # A new process (a crash mid-replay) resumes after what was acknowledged.
    again = SpoolReplayFiles(str(spool)).pending()
    assert [e.seq for e, _ in again] == [1]
    [batch] = files.read([again[0][0]])
    assert batch.lines == b'{"v":1}\n{"v":2}\n' and batch.events == 2 and batch.seq == 1


# -- the breaker replaying through a primary ------------------------------------------------


class ReplayableExporter(BatchSink):
    """Fails the batches whose seq is in ``failing`` (once each), and records what it got:
    ``("live", seq)`` for a batch, ``("replay", seq)`` for a spooled one."""

    failing: ClassVar[set[int]] = set()
    fail_replays: ClassVar[int] = 0
    log: ClassVar[list[tuple[str, int, list[int]]]] = []

    async def write(self, batch: Batch) -> None:
        if batch.seq in self.failing:
            self.failing.discard(batch.seq)
            raise ConnectionError("stream unreachable")
        self.log.append(("live", batch.seq, batch.events["value"].tolist()))

    async def write_spooled(self, batches: Sequence[SpooledBatch]) -> None:
        if ReplayableExporter.fail_replays:
            ReplayableExporter.fail_replays -= 1
            raise ConnectionError("still unreachable")
        for b in batches:
            values = [json.loads(line)["value"] for line in b.lines.splitlines()]
            assert len(values) == b.events
            self.log.append(("replay", b.seq, values))


def numbered(n_batches: int, size: int) -> list[Batch]:
    return [make_batch(seq=i, value=np.arange(i * size, (i + 1) * size)) for i in range(n_batches)]


def outcomes(pipe: Pipeline) -> dict[tuple[str, str], int]:
    return {(d["outcome"], d["reason"]): d["count"] for d in pipe.statistics().ledger.as_dict()["detail"]}


async def run_guarded(batches: list[Batch], spool: Path, **config: Any) -> Pipeline:
    pipe = Pipeline(
        [
            NodeSpec("source", TestingSource, TestingSourceConfig(tuple(batches))),
            NodeSpec(
                "export",
                CircuitBreakerSink.around(ReplayableExporter),
                CircuitBreakerConfig(fallback_config={"path": str(spool)}, **config),
            ),
        ],
        [1],
        settings=settings(limits={"max_inflight_events": 0, "max_inflight_bytes": 0}),
    )
    await pipe.run()
    return pipe


async def test_the_spool_is_replayed_in_order_before_the_next_batch(tmp_path: Path) -> None:
    ReplayableExporter.failing = {1, 2}
    ReplayableExporter.fail_replays = 0
    ReplayableExporter.log = []
    spool = tmp_path / "spool.jsonl"
    pipe = await run_guarded(numbered(5, 10), spool, failure_threshold=5)
    assert [(kind, seq) for kind, seq, _ in ReplayableExporter.log] == [
        ("live", 0),
        ("replay", 1),
        ("replay", 2),
        ("live", 3),
        ("live", 4),
    ]
    values = [v for _, _, vs in ReplayableExporter.log for v in vs]
    assert values == list(range(50))
    # The replayed events keep their one outcome (fallback); nothing is counted twice.
    assert outcomes(pipe) == {("delivered", ""): 30, ("fallback", "primary failed"): 20}
    stats = pipe.nodes[1].statistics()  # type: ignore[attr-defined]
    assert (stats.replayed_batches, stats.replayed_events) == (2, 20)
    # All replayed: the spool starts afresh, the position file is gone.
    assert spool.read_bytes() == b"" and Path(f"{spool}.index").read_bytes() == b""
    assert not Path(f"{spool}.replayed").exists()


async def test_a_failed_replay_spools_the_new_batch_behind_the_rest(tmp_path: Path) -> None:
    ReplayableExporter.failing = {1}
    ReplayableExporter.fail_replays = 1  # the first replay (at batch 2) fails too
    ReplayableExporter.log = []
    spool = tmp_path / "spool.jsonl"
    pipe = await run_guarded(numbered(4, 10), spool, failure_threshold=5)
    # Batch 2 went to the spool behind batch 1; both replayed, in order, before batch 3.
    assert [(kind, seq) for kind, seq, _ in ReplayableExporter.log] == [
        ("live", 0),
        ("replay", 1),
        ("replay", 2),
        ("live", 3),
    ]
    assert outcomes(pipe) == {
        ("delivered", ""): 20,
        ("fallback", "primary failed"): 10,
        ("fallback", "spool replay failed"): 10,
    }


async def test_a_spool_left_by_an_earlier_run_is_replayed_first(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    ReplayableExporter.failing = {0, 1}
    ReplayableExporter.fail_replays = 0
    ReplayableExporter.log = []
    await run_guarded(numbered(2, 10), spool, failure_threshold=5)
    # Batch 0 failed and was replayed before batch 1, which failed too: it stays spooled.
    assert [(kind, seq) for kind, seq, _ in ReplayableExporter.log] == [("replay", 0)]
    ReplayableExporter.log = []
    pipe = await run_guarded([make_batch(seq=7, value=np.arange(100, 110))], spool)
    assert [(kind, seq) for kind, seq, _ in ReplayableExporter.log] == [("replay", 1), ("live", 7)]
    assert outcomes(pipe) == {("delivered", ""): 10}


async def test_a_torn_index_line_is_cut_before_the_next_entry(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    ReplayableExporter.failing = {0, 1}
    ReplayableExporter.fail_replays = 0
    ReplayableExporter.log = []
    await run_guarded(numbered(2, 10), spool, failure_threshold=5)  # batch 1 stays spooled
    index = Path(f"{spool}.index")
    with index.open("ab") as f:
        f.write(b'{"run":"x","sou')  # a crash in the middle of an index line
    ReplayableExporter.failing = {5}
    ReplayableExporter.log = []
    await run_guarded(
        [make_batch(seq=5, value=np.arange(50, 60)), make_batch(seq=6, value=np.arange(60, 70))], spool
    )
    assert [(kind, seq) for kind, seq, _ in ReplayableExporter.log] == [
        ("replay", 1),
        ("replay", 5),
        ("live", 6),
    ]


async def test_a_corrupt_index_turns_replay_off_and_the_run_goes_on(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b'{"value":1}\n')
    Path(f"{spool}.index").write_bytes(b"not json\n")
    ReplayableExporter.failing = set()
    ReplayableExporter.fail_replays = 0
    ReplayableExporter.log = []
    pipe = await run_guarded(numbered(2, 10), spool)
    assert [(kind, seq) for kind, seq, _ in ReplayableExporter.log] == [("live", 0), ("live", 1)]
    assert outcomes(pipe) == {("delivered", ""): 20}
    assert spool.read_bytes() == b'{"value":1}\n'  # kept for a person to look at
