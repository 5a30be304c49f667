"""Spool replay bookkeeping (``stages.spool_replay``) against a model: batches spooled,
replays that fail part-way, crashes between a delivery and its position update, between the
spool and index writes, and while the spool is emptied.

Promises checked: batches are delivered in the order they were spooled; none is skipped; one
is delivered twice only when a crash came between its delivery and the position update (or
while the spool was being emptied) — the copies the stream's dedup window drops.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from stages.spool_replay import IndexEntry, SpoolReplayFiles, encode_entry, replay_groups


class SpoolReplayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-replay-"))
        self.path = self.dir / "spool.jsonl"
        self.path.touch()
        self.next_seq = 0
        self.indexed: list[int] = []  # model: seqs spooled with their index line, in order
        self.delivered: list[int] = []
        self.may_repeat: set[int] = set()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def files(self) -> SpoolReplayFiles:
        return SpoolReplayFiles(str(self.path))  # a fresh one each time: a new process knows nothing

    def _append_spool(self, events: int) -> tuple[int, int, int]:
        seq = self.next_seq
        self.next_seq += 1
        start = self.path.stat().st_size
        with self.path.open("ab") as f:
            f.write(b"".join(json.dumps({"seq": seq, "i": i}).encode() + b"\n" for i in range(events)))
        return seq, start, self.path.stat().st_size

    @rule(events=st.integers(1, 5))
    def spool(self, events: int) -> None:
        seq, start, end = self._append_spool(events)
        with self.files().index.open("ab") as f:
            f.write(encode_entry(IndexEntry("run", "src", seq, "ev", events, start, end)))
        self.indexed.append(seq)

    @rule(events=st.integers(1, 3))
    def crash_between_spool_and_index(self, events: int) -> None:
        self._append_spool(events)  # lines without an index line: never replayed

    @rule(
        fail_at=st.none() | st.integers(0, 4),
        crash_before_mark=st.booleans(),
        crash_while_emptying=st.booleans(),
        max_events=st.integers(1, 8),
        max_batches=st.integers(1, 4),
    )
    def replay(
        self,
        fail_at: int | None,
        crash_before_mark: bool,
        crash_while_emptying: bool,
        max_events: int,
        max_batches: int,
    ) -> None:
        files = self.files()
        pending = files.pending()
        groups = replay_groups(pending, max_events, max_batches)
        for i, group in enumerate(groups):
            if i == fail_at:
                return  # the primary failed: nothing of this group delivered, position kept
            batches = files.read([entry for entry, _ in group])
            for batch in batches:
                seqs = {json.loads(line)["seq"] for line in batch.lines.splitlines()}
                assert seqs == {batch.seq} and len(batch.lines.splitlines()) == batch.events
                self.delivered.append(batch.seq)
            if crash_before_mark and i == len(groups) - 1:
                self.may_repeat.update(b.seq for b in batches)
                return  # delivered, but the process died before the position was written
            files.mark_replayed(group[-1][1])
        index_bytes = files.index.stat().st_size if files.index.exists() else 0
        if files.replayed_bytes() >= index_bytes:  # all replayed: SpoolSink.empty()
            files.clear_position()  # the position first, then the index, then the spool
            if crash_while_emptying:
                self.may_repeat.update(self.indexed)
                return
            files.index.write_bytes(b"")
            self.path.write_bytes(b"")
            self.indexed = []

    @invariant()
    def delivered_in_order_without_gaps_or_unexplained_repeats(self) -> None:
        first_seen: list[int] = []
        for seq in self.delivered:
            if seq in first_seen:
                assert seq in self.may_repeat, f"batch {seq} delivered twice without a crash"
            else:
                first_seen.append(seq)
        assert first_seen == sorted(first_seen), "delivered out of order"
        # Whatever of the current spool was delivered is a prefix of it (nothing skipped).
        current = [seq for seq in first_seen if seq in set(self.indexed)]
        assert current == self.indexed[: len(current)]


TestSpoolReplay = SpoolReplayMachine.TestCase
