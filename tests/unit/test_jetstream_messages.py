"""The JetStream sink's pure part: how a batch's JSON lines become messages (chunks, subjects,
ids), the same on a first try and on a replay of the spooled lines."""

from __future__ import annotations

import msgspec
import numpy as np

from pipeline import InflightBudget, Ledger, StageContext
from pipeline.testing import make_batch
from stages.jetstream_sink import JetStreamConfig, JetStreamSink, chunk_ranges, message_id, subject_token
from stages.jsonl_sink import JsonLinesEncoder


def sink(**config: object) -> JetStreamSink:
    ctx = StageContext("js", "sink", Ledger(), InflightBudget())
    return JetStreamSink(msgspec.convert({"node": "node-a", **config}, JetStreamConfig), ctx)


def test_chunks_are_whole_lines_bounded_by_count_and_bytes() -> None:
    lines = b"".join(b"x" * n + b"\n" for n in [3, 3, 3, 10, 1])
    assert chunk_ranges(lines, 2, 1000) == [(0, 8, 2), (8, 23, 2), (23, 25, 1)]
    # By bytes: 8 bytes hold two 4-byte lines; the 11-byte line goes alone.
    assert chunk_ranges(lines, 100, 8) == [(0, 8, 2), (8, 12, 1), (12, 23, 1), (23, 25, 1)]
    assert chunk_ranges(b"", 10, 10) == []


def test_subjects_and_ids() -> None:
    assert subject_token("exec.decoder") == "exec_decoder"
    assert subject_token("") == "_"
    assert message_id("n", "r", "src", 4, "exec", 2) == "n:r:src:4:exec:2"


def test_a_replay_of_the_spooled_lines_gives_the_same_messages() -> None:
    batch = make_batch(source="synthetic", seq=9, ts_ns=np.arange(250) + 10**9, value=np.arange(250))
    lines = JsonLinesEncoder().encode(batch.events, batch.weights, "exec")
    for fmt in ("json", "msgpack"):
        s = sink(format=fmt, max_events_per_message=100)
        first = s.messages("run1", "synthetic", 9, "exec", lines, 1 << 20)
        again = s.messages("run1", "synthetic", 9, "exec", lines, 1 << 20)
        assert first == again
        assert [m.events for m in first] == [100, 100, 50]
        assert [m.msg_id for m in first] == [f"node-a:run1:synthetic:9:exec:{i}" for i in range(3)]
        assert {m.subject for m in first} == {"bpfpipe.node-a.synthetic.exec"}
        if fmt == "json":
            assert b"".join(m.payload for m in first) == lines
        else:
            decoded = [row for m in first for row in msgspec.msgpack.decode(m.payload)]
            assert decoded == msgspec.json.Decoder().decode_lines(lines)
