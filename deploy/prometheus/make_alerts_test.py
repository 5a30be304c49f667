"""Writes alerts_test.yml: for every alert in alerts.yml, one case that fires it from
synthetic series and one that stays silent on healthy ones (promtool test rules).

The cases live here as data; the expected annotations are alerts.yml's templates with
the firing alert's labels filled in (they use only ``$labels``), so a changed
annotation regenerates with the file. Run after editing either::

    .venv/bin/python deploy/prometheus/make_alerts_test.py
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
N = 'instance="node1:9090", job="bpfpipe"'
LABELS = {"instance": "node1:9090", "job": "bpfpipe"}


def lat(metric: str, les: list[str], hot: str) -> list[tuple[str, str]]:
    """Histogram buckets (cumulative) with 100 events a minute landing in bucket ``hot``."""
    out = []
    hot_index = les.index(hot)
    for i, le in enumerate(les):
        values = "0+100x20" if i >= hot_index else "0x20"
        out.append((f'{metric}_bucket{{{N}, program="xdp_firewall", le="{le}"}}', values))
    return out


NS = ["100", "500", "1000", "5000", "10000", "+Inf"]
SECONDS = ["0.001", "0.01", "0.1", "0.5", "1", "2.5", "5", "+Inf"]

# alert: (eval_time, firing series, healthy series, labels of the firing alert)
CASES: dict[str, tuple[str, list[tuple[str, str]], list[tuple[str, str]], dict[str, str]]] = {
    "BpfpipeAgentDown": ("3m", [(f"up{{{N}}}", "0x5")], [(f"up{{{N}}}", "1x5")], LABELS),
    "BpfpipeNotReady": ("4m", [(f"bpfpipe_ready{{{N}}}", "0x5")], [(f"bpfpipe_ready{{{N}}}", "1x5")], LABELS),
    "BpfpipeProgramNotLoaded": (
        "3m",
        [(f'bpfpipe_health_check_healthy{{{N}, check="programs_loaded", critical="true"}}', "0x5")],
        [(f'bpfpipe_health_check_healthy{{{N}, check="programs_loaded", critical="true"}}', "1x5")],
        {**LABELS, "check": "programs_loaded", "critical": "true"},
    ),
    "BpfpipeHeartbeatLate": (
        "3m",
        [(f'bpfpipe_health_check_healthy{{{N}, check="heartbeat", critical="true"}}', "1 1 0 0 0 0")],
        [(f'bpfpipe_health_check_healthy{{{N}, check="heartbeat", critical="true"}}', "1x5")],
        {**LABELS, "check": "heartbeat", "critical": "true"},
    ),
    "BpfpipeEventsLost": (
        "12m",
        [
            (
                f'bpfpipe_events_total{{{N}, outcome="lost_on_reserve", stage="exec", reason="ring full"}}',
                "0+60x15",
            )
        ],
        [
            (
                f'bpfpipe_events_total{{{N}, outcome="lost_on_reserve", stage="exec", reason="ring full"}}',
                "0x15",
            )
        ],
        {"instance": "node1:9090"},
    ),
    "BpfpipeAccountingGap": (
        "25m",
        [
            (f"bpfpipe_events_produced_total{{{N}}}", "0+1000x30"),
            (f'bpfpipe_events_total{{{N}, outcome="delivered", stage="sink", reason=""}}', "0+900x30"),
        ],
        [
            (f"bpfpipe_events_produced_total{{{N}}}", "0+1000x30"),
            (f'bpfpipe_events_total{{{N}, outcome="delivered", stage="sink", reason=""}}', "0+990x30"),
        ],
        {"instance": "node1:9090"},
    ),
    "BpfpipeRingBufferHigh": (
        "3m",
        [(f'bpf_ringbuf_usage_percent{{{N}, program="exec"}}', "95x5")],
        [(f'bpf_ringbuf_usage_percent{{{N}, program="exec"}}', "89x5")],
        {**LABELS, "program": "exec"},
    ),
    "BpfpipeMapNearFull": (
        "7m",
        [
            (f'bpf_map_entries{{{N}, program="xdp_firewall", map="rate_limit_state"}}', "60000x10"),
            (f'bpf_map_max_entries{{{N}, program="xdp_firewall", map="rate_limit_state"}}', "65536x10"),
        ],
        [
            (f'bpf_map_entries{{{N}, program="xdp_firewall", map="rate_limit_state"}}', "50000x10"),
            (f'bpf_map_max_entries{{{N}, program="xdp_firewall", map="rate_limit_state"}}', "65536x10"),
        ],
        {**LABELS, "program": "xdp_firewall", "map": "rate_limit_state"},
    ),
    "BpfpipeKernelLatencyHigh": (
        "17m",
        lat("bpf_processing_latency_ns", NS, "10000"),
        lat("bpf_processing_latency_ns", NS, "100"),
        {"instance": "node1:9090", "program": "xdp_firewall"},
    ),
    "BpfpipeEndToEndLatencyHigh": (
        "17m",
        lat("bpfpipe_end_to_end_latency_seconds", SECONDS, "2.5"),
        lat("bpfpipe_end_to_end_latency_seconds", SECONDS, "0.01"),
        {"instance": "node1:9090"},
    ),
    "BpfpipeHighCpu": (
        "25m",
        [(f"process_cpu_seconds_total{{{N}}}", "0+48x30")],
        [(f"process_cpu_seconds_total{{{N}}}", "0+6x30")],
        LABELS,
    ),
    "BpfpipeBreakerOpen": (
        "4m",
        [(f'bpfpipe_breaker_state{{{N}, stage="breaker", state="open"}}', "1x5")],
        [(f'bpfpipe_breaker_state{{{N}, stage="breaker", state="open"}}', "0x5")],
        {**LABELS, "stage": "breaker", "state": "open"},
    ),
    "BpfpipeConfigReloadFailed": (
        "5m",
        [(f"bpfpipe_config_reload_failures_total{{{N}}}", "0 0 0 1 1 1")],
        [(f"bpfpipe_config_reload_failures_total{{{N}}}", "0x5")],
        LABELS,
    ),
    "BpfpipeSamplingEngaged": (
        "35m",
        [(f'bpfpipe_sampling_rate{{{N}, stage="sampler"}}', "4x40")],
        [(f'bpfpipe_sampling_rate{{{N}, stage="sampler"}}', "1x40")],
        {"instance": "node1:9090"},
    ),
}


def render(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), template)


def generate() -> str:
    """The text of alerts_test.yml."""
    rules = yaml.safe_load((HERE / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) == set(CASES), set(alerts) ^ set(CASES)
    tests = []
    for name, (at, firing, healthy, labels) in CASES.items():
        rule = alerts[name]
        expected = {"exp_labels": {**labels, **rule["labels"]}}
        expected["exp_annotations"] = {k: render(v, labels) for k, v in rule["annotations"].items()}
        for series, alerts_expected in ((firing, [expected]), (healthy, [])):
            tests.append(
                {
                    "name": f"{name} {'fires' if alerts_expected else 'stays silent'}",
                    "interval": "1m",
                    "input_series": [{"series": s, "values": v} for s, v in series],
                    "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": alerts_expected}],
                }
            )
    header = "# Generated by make_alerts_test.py from its cases and alerts.yml; do not edit.\n"
    doc = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    return header + yaml.safe_dump(doc, sort_keys=False, width=200)


def main() -> None:
    (HERE / "alerts_test.yml").write_text(generate())


if __name__ == "__main__":
    main()
