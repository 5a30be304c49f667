"""Fleet policy (issue #11) as operators run it: a real nats-server on loopback (started and
stopped by the test), ``bpfpipe run`` agents with ``[fleet]``, ``bpfpipe policy`` to set it.

* Three agents with different node names — two synthetic sources with a sampler, one XDP
  firewall on a veth into a private namespace: a global policy set with ``bpfpipe policy
  set`` reaches all three within 2 s (acknowledged revisions in their statuses); a node
  override applies to that node only; an invalid policy is refused by ``policy set`` with
  one line, and, written to the bucket anyway, rejected by every agent (reported in status)
  while the old one stays in force — the firewall still blocks the old address (counted).
* The control plane going away: the agent keeps its last policy (one log line), and once
  the server is back a new policy reaches it.

The time from ``policy set`` to every agent acknowledged is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _cli import bpfpipe, free_port
from _fleet import raw_put, statuses, synthetic_config, wait_statuses
from _nats import nats_cluster, require_nats
from _running_agent import RunningAgent, http
from integration._dual_stack import DualStack
from integration._netns import interface_exists, netns_exists, veth_netns

pytestmark = [pytest.mark.nats]

SYNTHETIC_NODES = ("alpha", "beta")
FIREWALL_NODE = "gamma"
NODES = (*SYNTHETIC_NODES, FIREWALL_NODE)


def firewall_config(interface: str, servers: list[str], blocked: list[str]) -> str:
    return (
        "watch_config = false\n"
        '[source]\nuse = "xdp_firewall"\n'
        f'config = {{ options = {{ interface = "{interface}", mode = "skb" }}, '
        f"blocked_ips = {json.dumps(blocked)} }}\n"
        '[sink]\nuse = "null"\n'
        f"[fleet]\nservers = {json.dumps(servers)}\nnode = {json.dumps(FIREWALL_NODE)}\n"
    )


def policy_set(tmp_path: Path, url: str, policy: Any, *extra: str) -> Any:
    path = tmp_path / f"policy-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(policy))
    return bpfpipe("policy", "set", str(path), "--servers", url, *extra)


def effective(agent: RunningAgent) -> dict[str, Any]:
    code, body = http("GET", agent.admin_port, "/admin/config")
    assert code == 200, body
    return dict(body)


def sampler_max(agent: RunningAgent) -> int:
    return int(effective(agent)["config"]["stages"][0]["config"]["max_sample_rate"])


def all_at(revisions: dict[str, int], nodes: tuple[str, ...] = NODES) -> Any:
    """Statuses where each node runs (ok) these revisions (``global``, and ``node.<n>`` if given)."""

    def accept(docs: dict[str, dict[str, Any]]) -> bool:
        return all(
            n in docs
            and docs[n]["ok"]
            and all(
                docs[n]["revisions"].get(k, 0) == v
                for k, v in revisions.items()
                if k in ("global", f"node.{n}")
            )
            for n in nodes
        )

    return accept


@pytest.mark.bpf
def test_three_agents_follow_the_fleet_policy(tmp_path: Path, unique_name: str) -> None:
    require_nats()
    blocked_host, newly_host, allowed_host = 20, 24, 40
    with nats_cluster(tmp_path, n=1) as cluster, veth_netns(unique_name) as net:
        url = cluster.urls[0]
        stack = DualStack(net, [blocked_host, newly_host, allowed_host], [])
        v4 = stack.v4
        agents: dict[str, RunningAgent] = {}
        try:
            for node in SYNTHETIC_NODES:
                config = tmp_path / f"{node}.toml"
                config.write_text(synthetic_config(cluster.urls, node))
                agents[node] = RunningAgent("--config", str(config), admin_port=free_port())
            config = tmp_path / f"{FIREWALL_NODE}.toml"
            config.write_text(firewall_config(net.host_if, cluster.urls, []))
            agents[FIREWALL_NODE] = RunningAgent("--config", str(config), admin_port=free_port())
            for agent in agents.values():
                agent.wait_for('msg="startup: mark ready"', timeout=120)
            wait_statuses(url, all_at({"global": 0}))  # every agent has reported in

            # A global policy: reaches all three within 2 s, acknowledged.
            policy = {
                "source": {"config": {"blocked_ips": [v4(blocked_host)]}},
                "sampler": {"max_sample_rate": 300},
                "limits": {"max_events_per_sec": 50000},
            }
            started = time.monotonic()
            done = policy_set(tmp_path, url, policy)
            stored = time.monotonic()
            assert done.returncode == 0, done.stderr
            revision = int(done.stdout.split("revision")[1])
            docs, acknowledged = wait_statuses(url, all_at({"global": revision}), timeout=10, interval=0.01)
            print(
                f"\nfleet policy: all 3 agents acknowledged {acknowledged - stored:.3f} s after `policy set`"
                f" exited, {acknowledged - started:.3f} s after it started (bench/fleet.py: from the put)"
            )
            assert acknowledged - stored <= 2.0, docs
            assert all(sampler_max(agents[n]) == 300 for n in SYNTHETIC_NODES)
            assert all(
                effective(a)["config"]["limits"]["max_events_per_sec"] == 50000 for a in agents.values()
            )
            firewall = effective(agents[FIREWALL_NODE])["config"]["source"]["config"]
            assert firewall["blocked_ips"] == [v4(blocked_host)]

            sources = [v4(blocked_host), v4(newly_host), v4(allowed_host)]

            def passed() -> Counter[str]:
                assert stack.send(sources, 5) == Counter(dict.fromkeys(sources, 5))
                return stack.receive(lambda c: sum(c.values()) >= 10)

            assert passed() == Counter({v4(newly_host): 5, v4(allowed_host): 5})

            # A node override applies to that node only.
            done = policy_set(tmp_path, url, {"sampler": {"max_sample_rate": 7}}, "--node", "beta")
            assert done.returncode == 0, done.stderr
            override = int(done.stdout.split("revision")[1])
            docs, _ = wait_statuses(url, all_at({"global": revision, "node.beta": override}))
            assert (sampler_max(agents["alpha"]), sampler_max(agents["beta"])) == (300, 7)
            assert docs["alpha"]["revisions"] == {"global": revision, "node.alpha": 0}
            versions = {n: effective(a)["version"] for n, a in agents.items()}

            # An invalid policy: `policy set` refuses it (one line, exit 2, nothing stored)...
            invalid = {**policy, "source": {"config": {"blocked_ips": [v4(newly_host), "10.0.0.300"]}}}
            done = policy_set(tmp_path, url, invalid)
            assert done.returncode == 2, done.stderr
            assert done.stderr.strip().splitlines() == [
                'bpfpipe: error: source.config.blocked_ips[1]: not an IP address or prefix: "10.0.0.300"'
            ], done.stderr
            assert statuses(url)["alpha"]["revisions"]["global"] == revision
            # ...and written to the bucket anyway, every agent rejects it and says so.
            bad = raw_put(url, "global", json.dumps(invalid).encode())
            docs, _ = wait_statuses(
                url, lambda d: all(n in d and d[n]["rejected_revisions"].get("global") == bad for n in NODES)
            )
            shown = bpfpipe("policy", "get", "--servers", url)  # what is stored, as it is
            assert shown.returncode == 0 and json.loads(shown.stdout) == invalid
            for node in NODES:
                doc = docs[node]
                assert not doc["ok"] and doc["revisions"]["global"] == revision, doc
                assert doc["error"].startswith("source.config.blocked_ips[1]: not an IP address"), doc
            # The old policy stays in force: same versions, same values, the same addresses blocked.
            assert {n: effective(a)["version"] for n, a in agents.items()} == versions
            assert (sampler_max(agents["alpha"]), sampler_max(agents["beta"])) == (300, 7)
            assert passed() == Counter({v4(newly_host): 5, v4(allowed_host): 5})

            # A valid policy after it applies again (the firewall now blocks the other address).
            policy["source"] = {"config": {"blocked_ips": [v4(newly_host)]}}
            done = policy_set(tmp_path, url, policy)
            assert done.returncode == 0, done.stderr
            wait_statuses(url, all_at({"global": int(done.stdout.split("revision")[1])}))
            assert passed() == Counter({v4(blocked_host): 5, v4(allowed_host): 5})

            table = bpfpipe("policy", "status", "--servers", url)
            assert table.returncode == 0 and all(n in table.stdout for n in NODES), table

            for agent in agents.values():
                assert agent.stop(signum=signal.SIGTERM) == 0, agent.stderr
        finally:
            for agent in agents.values():
                agent.kill()
            stack.close()
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (
            ["get", "--servers", "nats://127.0.0.1:1", "--timeout", "1"],
            4,
            "no NATS server answered at nats://127.0.0.1:1",
        ),
        (["get", "--node", "a.b", "--servers", "nats://127.0.0.1:1"], 2, "--node: expected 1-64 letters"),
        (
            ["status", "--servers", "http://x"],
            2,
            'fleet.servers[0]: expected a NATS URL such as nats://host:4222, got "http://x"',
        ),
        (
            ["set", "/nonexistent.json", "--servers", "nats://127.0.0.1:1"],
            2,
            "/nonexistent.json: cannot read policy file",
        ),
    ],
)
def test_policy_command_errors_are_one_line(args: list[str], code: int, line: str) -> None:
    done = bpfpipe("policy", *args, env={"BPFPIPE_FLEET_SERVERS": None, "BPFPIPE_CONFIG": None})
    assert done.returncode == code, done.stderr
    (only,) = done.stderr.strip().splitlines()
    assert only.startswith(f"bpfpipe: error: {line}"), done.stderr


def test_policy_set_refuses_a_bad_file_before_connecting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"limits": {"max_events_per_sec": 5}, "metrics_port": 1}')
    done = bpfpipe("policy", "set", str(bad), "--node", "edge-1", "--servers", "nats://127.0.0.1:1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "bpfpipe: error: node.edge-1: metrics_port: unknown key", done.stderr
    done = bpfpipe("policy", "status", env={"BPFPIPE_FLEET_SERVERS": None, "BPFPIPE_CONFIG": None})
    assert done.returncode == 2 and done.stderr.startswith("bpfpipe: error: --servers: no NATS servers"), done


def test_an_agent_keeps_its_policy_while_the_control_plane_is_away(tmp_path: Path) -> None:
    require_nats()
    with nats_cluster(tmp_path, n=1) as cluster:
        url = cluster.urls[0]
        server = cluster.servers[0]
        config = tmp_path / "alpha.toml"
        config.write_text(synthetic_config(cluster.urls, "alpha"))
        agent = RunningAgent("--config", str(config), admin_port=free_port())
        try:
            agent.wait_for('msg="startup: mark ready"', timeout=60)
            done = policy_set(tmp_path, url, {"sampler": {"max_sample_rate": 40}})
            assert done.returncode == 0, done.stderr
            wait_statuses(url, all_at({"global": int(done.stdout.split("revision")[1])}, ("alpha",)))
            assert sampler_max(agent) == 40
            shown = bpfpipe("policy", "get", "--servers", url)
            assert shown.returncode == 0 and json.loads(shown.stdout) == {"sampler": {"max_sample_rate": 40}}
            shown = bpfpipe("policy", "get", "--node", "alpha", "--servers", url)
            assert shown.returncode == 0 and json.loads(shown.stdout) == {}
            # A SIGHUP makes the file the truth again: the policy is put back over it.
            agent.signal(signal.SIGHUP)
            agent.wait_for("fleet policy applied", count=3, timeout=10)  # startup, the set, after SIGHUP
            assert sampler_max(agent) == 40

            server.stop()
            agent.wait_for("fleet control plane unreachable", timeout=10)
            time.sleep(3)  # several retries: still one line, still running on the last policy
            assert len(agent.matching("fleet control plane unreachable")) == 1, agent.stderr
            assert sampler_max(agent) == 40 and agent.proc.poll() is None
            # A SIGHUP meanwhile: the last known policy goes back over the file's values.
            agent.signal(signal.SIGHUP)
            agent.wait_for("fleet policy applied", count=4, timeout=10)
            assert sampler_max(agent) == 40
            down = bpfpipe("policy", "status", "--servers", url, "--timeout", "1")
            assert down.returncode == 4, down.stderr
            assert down.stderr.startswith(
                "bpfpipe: error: no NATS server answered at"
            ) and "Traceback" not in (down.stderr)

            server.start()
            done = policy_set(tmp_path, url, {"sampler": {"max_sample_rate": 60}})
            assert done.returncode == 0, done.stderr
            wait_statuses(url, all_at({"global": int(done.stdout.split("revision")[1])}, ("alpha",)))
            agent.wait_for("fleet control plane reachable again")
            assert sampler_max(agent) == 60
            assert agent.stop() == 0, agent.stderr
        finally:
            agent.kill()


def test_policy_before_any_bucket_is_one_line_exit_1(tmp_path: Path) -> None:
    require_nats()
    with nats_cluster(tmp_path, n=1) as cluster:
        url = cluster.urls[0]
        for command in ("get", "status"):
            done = bpfpipe("policy", command, "--servers", url)
            assert done.returncode == 1, done.stderr
            (only,) = done.stderr.strip().splitlines()
            assert only == (
                f"bpfpipe: error: no bucket 'bpfpipe-policy' at {url}: "
                "no agent or 'bpfpipe policy set' has used it yet"
            ), done.stderr
        assert statuses(url) == {}  # neither command made the bucket
