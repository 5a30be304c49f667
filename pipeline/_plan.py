"""``bpfpipe capacity``: the command-line face of :mod:`pipeline.capacity`.

From flags (``--rate``, ``--event-bytes``, ``--burst-s``, ``--cpus``) or measured from
a running agent (``--from-agent URL``: its ``/metrics`` sampled once a second for
``--sample-s`` seconds: the rate is the busiest second's, the event size the bytes
read from its ring buffers per event, and ``--burst-s`` unless given the longest run
of seconds above the mean rate). Prints the recommended config as TOML.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .capacity import Workload, load_calibration, recommend, render
from .errors import BpfpipeError, ConfigError

__all__ = ["add_capacity_parser", "cmd_capacity", "measure_agent"]


class AgentUnreachable(BpfpipeError):
    exit_code = 4


def add_capacity_parser(sub: Any) -> None:
    p = sub.add_parser(
        "capacity",
        help="recommend ring, channel, memory and sampling settings for a workload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rate", type=float, metavar="EV_PER_S", help="peak events per second")
    p.add_argument("--event-bytes", type=int, metavar="B", help="size of one event struct")
    p.add_argument(
        "--burst-s", type=float, metavar="S", help="longest downstream stall to ride out (default 1)"
    )
    p.add_argument("--cpus", type=float, default=1.0, metavar="N", help="CPU the agent may use, cores")
    p.add_argument(
        "--from-agent", metavar="URL", help="measure rate, size, burstiness from an agent's metrics"
    )
    p.add_argument("--sample-s", type=float, default=10.0, metavar="S", help="how long --from-agent samples")
    p.add_argument("--calibration", metavar="FILE", help="costs from bench/calibrate.py (default: shipped)")


@dataclass(frozen=True, slots=True)
class Measured:
    rate_per_s: float
    event_bytes: int
    burst_s: float
    samples: int


def _scrape(url: str) -> dict[str, float]:
    """Sums of the counters capacity needs, by metric name (labels summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: a malformed URL
        reason = getattr(exc, "reason", None) or exc
        problem = f"no agent answering at {url} ({reason}); is --from-agent its metrics URL?"
        raise AgentUnreachable(problem) from None
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        raise AgentUnreachable(f"{url}/metrics is not Prometheus text ({exc}): not a bpfpipe agent") from None
    return totals


READ_RECORDS = "bpfpipe_ringbuf_records_read_total"
READ_BYTES = "bpfpipe_ringbuf_bytes_read_total"


def measure_agent(url: str, seconds: float) -> Measured:
    first = previous = _scrape(url)
    if READ_RECORDS not in first or READ_BYTES not in first:
        raise AgentUnreachable(
            f"{url}/metrics has no {READ_RECORDS}/{READ_BYTES}: not a bpfpipe agent with a ring"
        )
    rates: list[float] = []
    start = last = time.monotonic()
    while last - start < seconds:
        time.sleep(1.0)
        now = time.monotonic()
        current = _scrape(url)
        rates.append((current[READ_RECORDS] - previous[READ_RECORDS]) / (now - last))
        previous, last = current, now
    records = previous[READ_RECORDS] - first[READ_RECORDS]
    size = (previous[READ_BYTES] - first[READ_BYTES]) / records if records else 64.0
    mean = sum(rates) / len(rates) if rates else 0.0
    longest = run = 0
    for rate in rates:
        run = run + 1 if rate > mean else 0
        longest = max(longest, run)
    return Measured(max(rates, default=0.0), max(1, round(size) - 8), float(max(1, longest)), len(rates))


def cmd_capacity(args: argparse.Namespace) -> int:
    try:
        calibration = load_calibration(args.calibration)
    except OSError as exc:
        raise ConfigError("--calibration", f"cannot read {args.calibration}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, a key missing, not numbers
        problem = f"{args.calibration} is not a calibration file ({type(exc).__name__}: {exc})"
        raise ConfigError("--calibration", problem) from None
    if args.from_agent:
        measured = measure_agent(args.from_agent, args.sample_s)
        sys.stdout.write(
            f"# measured {args.from_agent} over {measured.samples} s: "
            f"peak {measured.rate_per_s:.0f} events/s, {measured.event_bytes} bytes/event, "
            f"bursts of {measured.burst_s:g} s\n"
        )
        rate, size = measured.rate_per_s, measured.event_bytes
        burst = args.burst_s if args.burst_s is not None else measured.burst_s
        if rate <= 0:
            raise ConfigError("--from-agent", "the agent read no events while sampled; give --rate instead")
    else:
        if args.rate is None or args.event_bytes is None:
            raise ConfigError("capacity", "give --rate and --event-bytes, or --from-agent URL")
        rate, size, burst = args.rate, args.event_bytes, 1.0 if args.burst_s is None else args.burst_s
    for flag, value in (("--rate", rate), ("--event-bytes", size), ("--cpus", args.cpus)):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(flag, f"expected a number > 0, got {value:g}")
    if not math.isfinite(burst) or burst < 0:
        raise ConfigError("--burst-s", f"expected a number >= 0, got {burst:g}")
    work = Workload(rate_per_s=rate, event_bytes=int(size), burst_s=burst, cpus=args.cpus)
    sys.stdout.write(render(work, calibration, recommend(work, calibration)))
    return 0
