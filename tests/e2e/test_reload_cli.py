"""Live reload as a user does it: edit the file, ``kill -HUP``, and the running agent
takes it (or, when it is broken, keeps what it runs and says why in one line).

Synthetic source, no kernel needed. The figures these tests measure (reload latency,
events in flight at a graph switch) are printed (``pytest -s``), never asserted on."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
from pathlib import Path

from _cli import assert_accounts_balance, free_port, own_lines, write_module
from _running_agent import RunningAgent, http, log_field, wait_http

RELOADED = r'msg="config reloaded: version (\d+)"'
FAILED = r'msg="config reload failed'


NULL_SINK = '[sink]\nuse = "null"\n'


def config_text(stages: str = "", *, total_events: int = 0, sink: str = NULL_SINK) -> str:
    source = (
        '[source]\nuse = "synthetic"\n'
        f"config = {{ rate_per_s = 5000, batch_size = 100, total_events = {total_events} }}\n"
    )
    # SIGHUP is the trigger under test: the file watcher (which would also see the edits) is off.
    return f"watch_config = false\n{source}\n{stages}\n{sink}"


SAMPLER = '[[stages]]\nuse = "sampler"\nconfig = {{ seed = 1{extra} }}\n'


def test_sighup_broken_file_keeps_the_old_config_then_a_good_one_applies(tmp_path: Path) -> None:
    path = tmp_path / "bpfpipe.toml"
    path.write_text(config_text(SAMPLER.format(extra="")))
    admin, metrics = free_port(), free_port()
    agent = RunningAgent("--config", str(path), env={"ADMIN_PORT": str(admin), "METRICS_PORT": str(metrics)})
    try:
        before = wait_http(admin, "/admin/config")
        assert before["version"] == 1
        agent.wait_for('msg="pipeline started"')

        path.write_text(config_text(SAMPLER.format(extra=', min_sample_rate = "four"')))
        agent.signal(signal.SIGHUP)
        [failed] = agent.wait_for(FAILED)
        assert "stages[0].config.min_sample_rate: expected int" in failed, failed
        assert http("GET", admin, "/admin/config") == (200, before)  # version and config unchanged
        status, text = http("GET", metrics, "/metrics")
        assert status == 200
        assert re.search(r"^bpfpipe_config_reload_failures_total 1(\.0)?$", text, re.M), text
        assert re.search(r"^bpfpipe_config_version 1(\.0)?$", text, re.M), text

        path.write_text(config_text(SAMPLER.format(extra=", min_sample_rate = 4")))
        agent.signal(signal.SIGHUP)
        [applied] = agent.wait_for(RELOADED)
        agent.wait_for(r'msg="sampling rate 1 -> 4 \(new bounds\)"')
        after = wait_http(admin, "/admin/config")
        assert after["version"] == 2
        assert after["config"]["stages"][0]["config"] == {"seed": 1, "min_sample_rate": 4}
        print(f"\npolicy reload (sampler bounds) by SIGHUP: {log_field(applied, 'duration_ms')} ms")
    finally:
        code = agent.stop()
    assert code == 0, agent.stderr
    assert len(agent.matching(FAILED)) == 1, agent.stderr  # one line for the one failure
    own_lines(agent.stderr, at_most=0)
    totals = assert_accounts_balance(agent.stderr)
    assert totals["outcome_delivered"] > 0


FILTER = """\
    from pipeline import Batch, BatchStage


    class DropThirds(BatchStage):
        def process(self, batch: Batch) -> Batch:
            return batch.select(batch.events["seq"] % 3 != 0)
"""

FILTER_STAGE = '[[stages]]\nuse = "reload_filter:DropThirds"\nname = "drop-thirds"\n'


def test_adding_a_filter_stage_under_load_accounts_every_seq_once(tmp_path: Path) -> None:
    write_module(tmp_path, "reload_filter", FILTER)
    out = tmp_path / "events.jsonl"
    sink = f'[sink]\nuse = "jsonl"\nconfig = {{ path = {json.dumps(str(out))} }}\n'
    total = 40_000  # 8 s at 5,000 events/s
    path = tmp_path / "bpfpipe.toml"
    path.write_text(config_text(total_events=total, sink=sink))
    admin = free_port()
    pythonpath = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    agent = RunningAgent("--config", str(path), env={"ADMIN_PORT": str(admin), "PYTHONPATH": pythonpath})
    try:
        wait_http(admin, "/admin/config")
        agent.wait_for('msg="pipeline started"')
        time.sleep(1.0)  # under way: some events before the switch
        path.write_text(config_text(FILTER_STAGE, total_events=total, sink=sink))
        agent.signal(signal.SIGHUP)
        [applied] = agent.wait_for(RELOADED)
        assert wait_http(admin, "/admin/config")["version"] == 2
        code = agent.wait(60)  # the source ends after `total` events; the run finishes
    finally:
        agent.stop()
    assert code == 0, agent.stderr
    assert log_field(applied, "graph_switched") == "True"
    [switched] = agent.matching(r'msg="stage chain switched"')
    assert "synthetic -> drop-thirds -> jsonl" in switched

    seqs = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert all(a < b for a, b in itertools.pairwise(seqs)), "per-source order broken"
    delivered = set(seqs)
    assert len(delivered) == len(seqs)  # nothing twice
    assert delivered <= set(range(total))
    filtered = set(range(total)) - delivered
    # Every seq exactly once: delivered, or filtered by the new stage, after the switch.
    assert all(s % 3 == 0 for s in filtered)
    first_filtered = min(filtered)
    assert any(s % 3 == 0 for s in delivered), "the switch should come after some events"
    assert not any(s % 3 == 0 and s > first_filtered for s in delivered), "the switch is one boundary"
    assert len(filtered) > 1000, "the switch should come well before the end"

    totals = assert_accounts_balance(agent.stderr)
    assert totals["produced"] == total
    assert totals["outcome_delivered"] == len(delivered)
    assert totals["outcome_stage_dropped"] == len(filtered)
    assert len(agent.matching(r'msg="pipeline started"')) == 1  # the source never restarted
    print(
        f"\ngraph reload (add a stage) by SIGHUP: {log_field(applied, 'duration_ms')} ms;"
        f" events in flight at the switch: {log_field(switched, 'inflight_events')},"
        f" old chain drained in {float(log_field(switched, 'drain_s')) * 1000:.1f} ms"
    )
