"""SpoolSink: whole JSON lines, a hard size cap, overflow counted as dropped with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from pipeline import Batch, InflightBudget, Ledger, NodeSpec, Outcome, Pipeline, StageContext
from pipeline.testing import TestingSource, TestingSourceConfig, make_batch
from stages.spool_sink import SPOOL_FULL, SpoolConfig, SpoolSink


def batches(n_batches: int, size: int) -> list[Batch]:
    """Values from 100 up, so every line has the same length."""
    return [
        make_batch(seq=i, value=100 + np.arange(i * size, (i + 1) * size), comm=np.full(size, b"cat\nx"))
        for i in range(n_batches)
    ]


async def run_spool(config: SpoolConfig, items: list[Batch]) -> tuple[Pipeline, SpoolSink]:
    pipe = Pipeline(
        [
            NodeSpec("source", TestingSource, TestingSourceConfig(tuple(items))),
            NodeSpec("spool", SpoolSink, config),
        ],
        [4],
    )
    await pipe.run()
    sink = pipe.nodes[-1]
    assert isinstance(sink, SpoolSink)
    return pipe, sink


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_spools_every_event_as_a_json_line(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "nested" / "out.jsonl"  # parents are created
    pipe, sink = await run_spool(SpoolConfig(path=str(path)), batches(3, 5))
    lines = read_lines(path)
    assert [line["value"] for line in lines] == list(range(100, 115))
    assert lines[0]["comm"] == "cat\nx"  # newlines inside strings stay escaped: one event per line
    assert lines[0]["weight"] == 1.0
    ledger = pipe.statistics().ledger
    assert ledger.total(Outcome.DELIVERED) == 15
    assert ledger.pending == 0
    assert sink.statistics().size_bytes == path.stat().st_size


@pytest.mark.parametrize("extra", ["none", "half a line", "all but a byte"])
async def test_cap_cuts_at_a_line_boundary_and_counts_overflow(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "out.jsonl"
    one_line = len(msgspec.json.encode(next(batches(1, 1)[0].records()))) + 1
    spare = {"none": 0, "half a line": one_line // 2, "all but a byte": one_line - 1}[extra]
    max_bytes = one_line * 12 + spare  # room for exactly 12 whole lines
    pipe, sink = await run_spool(SpoolConfig(path=str(path), max_bytes=max_bytes), batches(4, 5))

    lines = read_lines(path)  # every line parses: nothing was cut mid-line
    assert [line["value"] for line in lines] == list(range(100, 112))
    assert path.stat().st_size <= max_bytes
    ledger = pipe.statistics().ledger
    assert ledger.total(Outcome.DELIVERED) == 12
    detail = {(d["outcome"], d["reason"]): d["count"] for d in ledger.as_dict()["detail"]}  # type: ignore[union-attr]
    assert detail[("stage_dropped", SPOOL_FULL)] == 8
    assert ledger.produced == 20
    assert ledger.pending == 0
    stats = sink.statistics()
    assert (stats.spooled_events, stats.overflow_events) == (12, 8)


async def test_cap_counts_what_the_file_already_held(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"x" * 1000)
    pipe, _ = await run_spool(SpoolConfig(path=str(path), max_bytes=1000), batches(2, 3))
    assert path.read_bytes() == b"x" * 1000
    ledger = pipe.statistics().ledger
    assert ledger.total(Outcome.DELIVERED) == 0
    assert ledger.total(Outcome.STAGE_DROPPED) == 6
    assert ledger.pending == 0


async def test_spool_returns_the_kept_prefix(tmp_path: Path) -> None:
    ctx = StageContext("spool", "sink", Ledger(), InflightBudget())
    sink = SpoolSink(SpoolConfig(path=str(tmp_path / "s.jsonl"), max_bytes=200), ctx)
    first, second = batches(2, 10)
    kept = await sink.spool(first)
    assert 0 < kept < 10
    assert await sink.spool(second) == 0  # full: nothing more, no partial line
    await sink.aclose()
    assert len(read_lines(tmp_path / "s.jsonl")) == kept


async def test_unwritable_path_drops_with_error_and_balances(tmp_path: Path) -> None:
    pipe, _ = await run_spool(SpoolConfig(path=str(tmp_path)), batches(2, 3))  # a directory
    stats = pipe.statistics()
    assert stats.stage("spool").errors == 2
    detail = {(d["outcome"], d["reason"]): d["count"] for d in stats.ledger.as_dict()["detail"]}  # type: ignore[union-attr]
    assert detail[("stage_dropped", "error")] == 6
    assert stats.ledger.pending == 0


@pytest.mark.parametrize("raw", [{"max_bytes": 0}, {"max_byte": 10}])
def test_config_is_checked(raw: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, SpoolConfig, strict=True)
