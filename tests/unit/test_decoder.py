"""Decoder: raw ring-buffer records (as the reader sends them) to typed batches."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from bpf.ringbuf import SimulatedRing
from pipeline import NodeSpec, Outcome, Pipeline
from pipeline.testing import TestingSink, TestingSource, TestingSourceConfig, make_batch, run_stages
from stages.decoder import Decoder, decode_records, event_struct, event_view, event_views
from stages.raw_records import RECORD_DTYPE, UNKNOWN_TYPE, EventSchema, RawRecords, raw_batch

HEADER = np.dtype([("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")])
EXEC = np.dtype([*HEADER.descr, ("pid", "<u4"), ("ppid", "<u4"), ("comm", "S16"), ("argv", "<u2", (3,))])
TICK = np.dtype([*HEADER.descr, ("seq", "<u8")])
SCHEMA = EventSchema({1: EXEC, 2: TICK}, {1: "exec", 2: "tick"}, HEADER)


def exec_events(n: int, *, rate: int = 1, start: int = 0) -> np.ndarray:
    ev = np.zeros(n, dtype=EXEC)
    ev["type"] = 1
    ev["rate"] = rate
    ev["pid"] = np.arange(start, start + n)
    ev["ppid"] = 1
    ev["comm"] = [f"proc{i}".encode() for i in range(start, start + n)]
    ev["argv"] = np.arange(3)
    return ev


def tick(seq: int, rate: int = 1) -> np.ndarray:
    ev = np.zeros(1, dtype=TICK)
    ev["type"] = 2
    ev["rate"] = rate
    ev["seq"] = seq
    return ev


def reader_batch(payloads: list[bytes], *, size: int = 1 << 16, start_pos: int = 0, seq: int = 0):
    """What the reader would send after the kernel wrote ``payloads``."""
    ring = SimulatedRing(size, start_pos=start_pos)
    try:
        assert ring.produce(payloads) == len(payloads)
        read = ring.read_batch()
    finally:
        ring.close()
    return raw_batch(read, SCHEMA, source="reader", seq=seq)


def test_uniform_records_decode_in_one_batch_across_the_wrap():
    events = exec_events(300, rate=1)
    # Start near the end of the ring so the batch wraps around it.
    batch = reader_batch([e.tobytes() for e in events], size=1 << 15, start_pos=(1 << 32) - 4000)
    assert batch.events.dtype == RECORD_DTYPE
    decoded = decode_records(batch)
    assert decoded.malformed == 0
    [out] = decoded.batches
    assert out.events.dtype == EXEC
    np.testing.assert_array_equal(out.events, events)
    assert out.events.flags.c_contiguous and out.events.base is None  # a compact copy, not a view
    assert (out.source, out.seq, out.read_time_ns) == ("reader", batch.seq, batch.read_time_ns)


def test_each_batch_is_named_after_its_event_type_and_keeps_the_name():
    payloads = [exec_events(1).tobytes(), tick(0).tobytes(), exec_events(1, start=1).tobytes()]
    exec_out, tick_out = decode_records(reader_batch(payloads)).batches
    assert (exec_out.event_name, tick_out.event_name) == ("exec", "tick")  # SCHEMA.names
    assert exec_out.select(np.array([False, True])).event_name == "exec"
    assert exec_out.replace(seq=9).event_name == "exec"
    assert exec_out.with_weights_scaled(2.0).event_name == "exec"
    assert make_batch(pid=[1]).event_name == ""  # a source that does not say


def test_a_type_without_a_name_is_named_by_its_id():
    schema = EventSchema({1: EXEC}, {}, HEADER)
    batch = reader_batch([exec_events(1).tobytes()])
    batch = batch.replace(payload=RawRecords(batch.payload.raw, schema))
    [out] = decode_records(batch).batches
    assert out.event_name == "type1"


def test_filtered_rows_take_the_gather_path():
    events = exec_events(50)
    batch = reader_batch([e.tobytes() for e in events])
    keep = np.zeros(50, dtype=bool)
    keep[[0, 1, 5, 17, 18, 49]] = True
    [out] = decode_records(batch.select(keep)).batches
    np.testing.assert_array_equal(out.events, events[keep])


def test_mixed_types_fan_out_one_batch_per_type_in_type_order():
    payloads, want_exec, want_tick = [], [], []
    for i in range(40):
        if i % 3 == 2:
            t = tick(i)
            want_tick.append(t)
            payloads.append(t.tobytes())
        else:
            e = exec_events(1, start=i)
            want_exec.append(e)
            payloads.append(e.tobytes())
    batch = reader_batch(payloads, seq=7)
    decoded = decode_records(batch)
    assert decoded.malformed == 0
    exec_out, tick_out = decoded.batches
    np.testing.assert_array_equal(exec_out.events, np.concatenate(want_exec))
    np.testing.assert_array_equal(tick_out.events, np.concatenate(want_tick))
    assert exec_out.seq == tick_out.seq == 7
    assert len(exec_out) + len(tick_out) == len(batch)


def test_records_longer_than_their_struct_decode_the_prefix():
    e = exec_events(3)
    batch = reader_batch([x.tobytes() + b"trailing bytes" for x in e])
    [out] = decode_records(batch).batches
    np.testing.assert_array_equal(out.events, e)


def test_truncated_unknown_and_headerless_records_are_malformed():
    good = exec_events(4, rate=2)
    payloads = [
        good[0].tobytes(),
        good[1].tobytes()[: EXEC.itemsize - 1],  # truncated exec
        good[2].tobytes(),
        np.array([(9, 0, 5, 0)], dtype=HEADER).tobytes() + bytes(40),  # unknown type 9
        b"\x01\x00",  # too short for a header at all
        good[3].tobytes(),
    ]
    batch = reader_batch(payloads)
    assert batch.events["type"].tolist() == [1, 1, 1, 9, UNKNOWN_TYPE, 1]
    decoded = decode_records(batch)
    [out] = decoded.batches
    np.testing.assert_array_equal(out.events, good[[0, 2, 3]])
    assert decoded.malformed == 3
    assert decoded.malformed_weight == 2.0 + 5.0 + 1.0  # their rates (1 for the headerless one)


def test_weights_are_the_header_rate():
    payloads = [exec_events(1, rate=r, start=i).tobytes() for i, r in enumerate([1, 4, 4, 0, 16])]
    batch = reader_batch(payloads)
    assert batch.weights.tolist() == [1.0, 4.0, 4.0, 1.0, 16.0]  # rate 0 (ungated) weighs 1
    [out] = decode_records(batch).batches
    assert out.weights.dtype == np.float64
    assert out.weights.tolist() == [1.0, 4.0, 4.0, 1.0, 16.0]
    assert out.events["rate"].tolist() == [1, 4, 4, 0, 16]


def test_unaligned_offsets_are_rejected():
    batch = reader_batch([exec_events(1).tobytes()])
    rows = batch.events.copy()
    rows["offset"] += 4
    with pytest.raises(ValueError, match="multiples of 8"):
        decode_records(batch.replace(events=rows))


def test_process_returns_one_batch_or_says_why_not():
    stage = Decoder.__new__(Decoder)
    single = reader_batch([e.tobytes() for e in exec_events(3)])
    out = stage.process(single)
    assert out is not None and out.events.dtype == EXEC
    mixed = reader_batch([exec_events(1).tobytes(), tick(0).tobytes()])
    with pytest.raises(ValueError, match="decode_records"):
        stage.process(mixed)
    plain = make_batch(pid=[1, 2])
    assert stage.process(plain) is plain


async def test_decoder_stage_accounts_for_every_record():
    good = exec_events(10)
    payloads = [g.tobytes() for g in good[:5]] + [b"\x01\x00\x00\x00"] + [tick(99).tobytes()]
    payloads += [g.tobytes() for g in good[5:]] + [good[0].tobytes()[:20]]
    batches = [reader_batch(payloads, seq=0), reader_batch([tick(1).tobytes()], seq=1)]
    result = await run_stages([Decoder], batches)
    ledger = result.ledger
    assert ledger.pending == 0
    assert ledger.produced == len(payloads) + 1
    assert ledger.total(Outcome.DELIVERED) == 12
    assert ledger.total(Outcome.STAGE_DROPPED) == 2
    [(key, tally)] = [(k, t) for k, t in ledger.outcomes.items() if k.outcome is Outcome.STAGE_DROPPED]
    assert key.reason == "malformed" and tally.count == 2
    dtypes = [b.events.dtype for b in result.batches]
    assert dtypes == [EXEC, TICK, TICK]
    np.testing.assert_array_equal(result.batches[0].events, good)
    assert result.batches[2].events["seq"].tolist() == [1]


async def test_non_raw_batches_pass_through():
    plain = make_batch(pid=[1, 2, 3])
    result = await run_stages([Decoder], [plain])
    assert result.batches == [plain]
    assert result.ledger.pending == 0


async def test_a_broken_payload_is_dropped_as_an_error_not_fatal():
    good = reader_batch([exec_events(1).tobytes()])
    broken = good.replace(payload=RawRecords(np.zeros((2, 2), dtype=np.uint8), SCHEMA))
    specs = [
        NodeSpec("source", TestingSource, TestingSourceConfig((broken, good))),
        NodeSpec("decoder", Decoder),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [2, 2])
    await pipe.run()
    stats = pipe.statistics()
    assert stats.stage("decoder").errors == 1
    assert stats.ledger.total(Outcome.DELIVERED) == 1
    assert stats.ledger.pending == 0


def test_event_view_and_event_views():
    ev = exec_events(3, rate=2)
    ev["comm"][1] = b"with\0garbage"
    batch = decode_records(reader_batch([e.tobytes() for e in ev])).batches[0]
    view = event_view(batch.events[1], "ExecEvent")
    assert isinstance(view, msgspec.Struct)
    assert type(view).__name__ == "ExecEvent"
    assert view.pid == 1 and view.comm == "with" and view.rate == 2 and view.argv == [0, 1, 2]
    views = event_views(batch, "ExecEvent")
    assert [v.comm for v in views] == ["proc0", "with", "proc2"]
    assert views[1] == view
    assert type(views[0]) is event_struct(EXEC, "ExecEvent")  # one class per dtype
    assert msgspec.json.decode(msgspec.json.encode(views[0]))["comm"] == "proc0"
    with pytest.raises(TypeError, match="structured"):
        event_struct(np.dtype("u4"))


def test_schema_validation_names_the_problem():
    with pytest.raises(ValueError, match="no 'rate' field"):
        EventSchema({}, {}, np.dtype([("type", "<u2"), ("cpu", "<u2")]))
    with pytest.raises(ValueError, match="aligned u16"):
        EventSchema({}, {}, np.dtype([("cpu", "<u1"), ("type", "<u2"), ("rate", "<u4")]))
    with pytest.raises(ValueError, match="smaller than"):
        EventSchema({3: np.dtype([("type", "<u2")])}, {}, HEADER)
    assert SCHEMA.name(1) == "exec" and SCHEMA.name(42) == "type42"


@pytest.mark.parametrize("seed", range(5))
def test_small_batches_decode_as_the_general_path_does(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to ``_FEW_RECORDS`` records the decoder checks them in Python; the result must be
    the vectorised path's, for well-formed and malformed batches alike."""
    import stages.decoder

    rng = np.random.default_rng(seed)
    for _ in range(200):
        n = int(rng.integers(1, stages.decoder._FEW_RECORDS + 1))
        payloads = []
        for i in range(n):
            kind = rng.random()
            if kind < 0.7:
                payloads.append(exec_events(1, rate=int(rng.integers(1, 4)), start=i).tobytes())
            elif kind < 0.85:
                payloads.append(tick(i).tobytes())
            elif kind < 0.95:
                payloads.append(exec_events(1).tobytes()[: int(rng.integers(1, EXEC.itemsize))])  # short
            else:
                payloads.append(tick(i).tobytes().replace(b"\x02", b"\x09", 1))  # unknown type
        batch = reader_batch(payloads, start_pos=int(rng.integers(0, 1 << 10)) * 8)
        few = decode_records(batch)
        monkeypatch.setattr(stages.decoder, "_FEW_RECORDS", 0)
        general = decode_records(batch)
        monkeypatch.undo()
        assert (few.malformed, few.malformed_weight) == (general.malformed, general.malformed_weight)
        assert len(few.batches) == len(general.batches)
        for a, b in zip(few.batches, general.batches, strict=True):
            assert a.events.dtype == b.events.dtype and a.events.tobytes() == b.events.tobytes()
            assert a.weights.tolist() == b.weights.tolist()
            assert (a.source, a.seq, a.read_time_ns, a.event_name) == (
                b.source,
                b.seq,
                b.read_time_ns,
                b.event_name,
            )
