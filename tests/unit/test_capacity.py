"""Capacity planning on fixed inputs, against figures worked out by hand (docs/capacity.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.capacity import Calibration, Workload, load_calibration, recommend, render
from pipeline.config import decode_config, read_toml

CAL = Calibration(per_event_us=0.5, per_batch_us=60.0, base_rss_mb=160.0, measured_on="test", source="test")


def test_a_node_within_budget() -> None:
    # 10 k exec-sized events/s, 2 s bursts, half a core (the worked example in docs/capacity.md).
    rec = recommend(Workload(rate_per_s=10_000, event_bytes=64, burst_s=2, cpus=0.5), CAL)
    assert rec.record_bytes == 72  # ceil8(64 + 8)
    # 1000 events per 100 ms read need 70.3 pages x4 -> 128 pages.
    assert (rec.ring_buffer_pages, rec.ring_buffer_bytes) == (128, 524_288)
    # The watermark (1/2 of the ring = 3641 records) is not reached: the 100 ms budget reads.
    assert rec.events_per_batch == pytest.approx(1000.0)
    assert rec.batches_per_s == pytest.approx(10.0)
    assert rec.expected_cpu_cores == pytest.approx(0.006, abs=0.0005)  # 5000 + 10 x 60 us per s
    assert rec.sample_rate == 1
    assert rec.capacity_per_s == pytest.approx(892_857, rel=1e-4)  # 0.5e6 / (0.5 + 60 / 1000)
    assert (rec.max_inflight_events, rec.max_inflight_bytes) == (20_000, 1_440_000)
    assert rec.channel_capacity == 7  # ceil(10 x 2 / 3)
    assert rec.max_memory_mb == 192  # 160 + 0.5 + 2 x 1.37 -> next 32 MiB
    assert rec.max_events_per_sec == 10_000


def test_a_node_over_budget_settles_at_a_sampling_rate() -> None:
    rec = recommend(Workload(rate_per_s=2_000_000, event_bytes=64, burst_s=1, cpus=1), CAL)
    assert (rec.ring_buffer_pages, rec.ring_buffer_bytes) == (16384, 67_108_864)  # 14063 pages -> 2^14
    assert rec.events_per_batch == pytest.approx(200_000.0)
    assert rec.capacity_per_s == pytest.approx(1_998_801, rel=1e-4)
    assert rec.sample_rate == 2
    assert rec.max_events_per_sec == 1_000_000
    assert (rec.max_inflight_events, rec.max_inflight_bytes) == (1_000_000, 72_000_000)
    assert rec.channel_capacity == 4  # ceil(10 x 1 / 3), the floor
    assert rec.max_memory_mb == 384  # 160 + 64 + 2 x 68.7
    assert rec.expected_cpu_cores == 1.0  # capped at the budget


def test_bad_workload_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="positive"):
        recommend(Workload(rate_per_s=0, event_bytes=64), CAL)


def test_rendered_recommendation_is_a_config_the_agent_accepts(tmp_path: Path) -> None:
    rec = recommend(Workload(rate_per_s=50_000, event_bytes=300, burst_s=1), CAL)
    text = render(Workload(rate_per_s=50_000, event_bytes=300, burst_s=1), CAL, rec)
    assert "calibration: test, measured test" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = decode_config(read_toml(path))
    assert config.ring_buffer_size == rec.ring_buffer_bytes
    assert config.limits.max_memory_mb == rec.max_memory_mb
    assert config.channels.capacity == rec.channel_capacity


def test_shipped_calibration_names_its_date(tmp_path: Path) -> None:
    shipped = load_calibration()
    assert shipped.per_event_us > 0 and shipped.per_batch_us > 0 and shipped.base_rss_mb > 0
    assert shipped.measured_on[:4].isdigit() and "shipped" in shipped.source
    own = tmp_path / "cal.json"
    own.write_text(json.dumps({"per_event_us": 1, "per_batch_us": 2, "base_rss_mb": 3, "date": "2030-01-01"}))
    assert load_calibration(own).measured_on.startswith("2030-01-01")
