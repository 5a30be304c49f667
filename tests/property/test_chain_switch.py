"""Random chains switched live at random moments (sometimes with a stop in the middle of
the last switch): every event the source sent ends exactly once (delivered or filtered),
each sink wrote only after the one before it finished, the sinks together wrote the seqs
in order, and the ledger balances. On trio's autojump clock."""

from __future__ import annotations

import itertools
from typing import Any

import trio
import trio.testing
from _switch_doubles import (
    RecordingSink,
    RecordingSinkConfig,
    SeqFilter,
    SeqFilterConfig,
    SeqSource,
    SeqSourceConfig,
    check_exactly_once,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import ChainSwitchError, NodeSpec, Pipeline
from stages.noop import NoopStage
from stages.synthetic import SyntheticConfig, SyntheticSource

STAGES: dict[str, tuple[type, Any]] = {
    "noop": (NoopStage, None),
    "halves": (SeqFilter, SeqFilterConfig(modulus=2)),
    "thirds": (SeqFilter, SeqFilterConfig(modulus=3)),
}

chains = st.tuples(
    st.lists(st.tuples(st.sampled_from(sorted(STAGES)), st.integers(1, 4)), max_size=3),
    st.integers(1, 4),  # into the sink
    st.sampled_from([0.0, 0.001, 0.004]),  # the sink's time per batch: fast, even, slow
)


def build(
    chain: tuple[list[tuple[str, int]], int, float], generation: int
) -> tuple[list[NodeSpec], list[int]]:
    stages, sink_capacity, per_batch_s = chain
    specs = []
    for i, (kind, _) in enumerate(stages):
        cls, config = STAGES[kind]
        specs.append(NodeSpec(f"{kind}-{i}", cls, config))
    specs.append(NodeSpec(f"sink-{generation}", RecordingSink, RecordingSinkConfig(per_batch_s=per_batch_s)))
    return specs, [c for _, c in stages] + [sink_capacity]


@settings(max_examples=25, deadline=None)
@given(
    first=chains,
    switches=st.lists(st.tuples(chains, st.floats(0.0, 0.05)), min_size=1, max_size=3),
    source=st.sampled_from(["send", "wait_room"]),
    stop_during_last=st.none() | st.floats(0.0, 0.02),
    run_after_s=st.floats(0.0, 0.05),
)
def test_switches_at_random_moments_lose_and_duplicate_nothing(
    first: Any, switches: Any, source: str, stop_during_last: float | None, run_after_s: float
) -> None:
    if source == "send":
        source_spec = NodeSpec("source", SeqSource, SeqSourceConfig(batch_size=5, interval_s=0.001))
    else:
        source_spec = NodeSpec("source", SyntheticSource, SyntheticConfig(rate_per_s=5000, batch_size=5))
    specs, capacities = build(first, 0)
    pipe = Pipeline([source_spec, *specs], capacities)
    refused: list[ChainSwitchError] = []

    async def switch(specs: list[NodeSpec], capacities: list[int]) -> None:
        try:
            result = await pipe.replace_chain(specs, capacities)
        except ChainSwitchError as exc:  # only when the stop came first
            refused.append(exc)
        else:
            assert result.inflight_events >= 0 and result.drain_s >= 0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(pipe.run)
            for generation, (chain, wait_s) in enumerate(switches, start=1):
                await trio.sleep(wait_s)
                last = generation == len(switches)
                if last and stop_during_last is not None:
                    nursery.start_soon(switch, *build(chain, generation))
                    await trio.sleep(stop_during_last)
                    pipe.stop()
                    return
                await switch(*build(chain, generation))
            await trio.sleep(run_after_s)
            pipe.stop()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    if stop_during_last is None:
        assert not refused and pipe.switches == len(switches)
    chains_run = [*pipe._retired, pipe._chain]
    sinks = [chain.nodes[-1] for chain in chains_run]
    filters = [n for chain in chains_run for n in chain.nodes if isinstance(n, SeqFilter)]
    assert all(isinstance(s, RecordingSink) for s in sinks)
    check_exactly_once(pipe, sinks, filters)
    # Each sink wrote only once the one before it had written its last batch.
    spans = [(s.writes[0][0], s.writes[-1][0]) for s in sinks if s.writes]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
