"""Benchmark: Verify with the parties on different hosts, 5 ms apart.

The same processes as ``suite_verify`` (three shareholder nodes with k = 2
and the matcher; the single-custody verifier and its one store; the one-hop
verifier holding templates in memory; all over mutual TLS on this machine),
but every call between two parties crosses a delaying TCP relay
(``tools/delay_relay.py``) that holds each byte 5 ms in each direction, the
round trip between two institutions' hosts. Loopback relays, not network
namespaces: the figure needs no root, and the relay is the same one the
namespace test (tests/test_netns_hosts.py) puts at each host's ingress.

Paths, each hop through the relay:

- split custody: provider -> matcher -> the nodes in parallel (k asked first,
  the rest after the matcher's hedge) -> matcher -> provider;
- single custody (the baseline): provider -> verifier -> its one store ->
  verifier -> provider; both designs make two sequential round trips;
- one hop: provider -> verifier holding the templates -> provider, the
  floor of any design that keeps templates off the payment terminal.

Each figure is measured twice in the same run, first through the same
relays with no delay (what the relays cost: a Python relay adds latency of
its own on a shared 2-core machine), then at 5 ms; ``wan_distance_cost_p50``
is the difference, what the distance alone costs each design, against a
floor of two round trips (20 ms) for both.

Latency: sequential calls from one client, interleaved in rounds across the
three systems (``suite_verify._latencies``); the provider signs a fresh
ticket per split-custody verification. The gallery is enrolled directly
(no relay), since only Verify is measured here.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

from bench import suite_verify as sv
from splitvault.v1 import common_pb2, shareholder_pb2
from vault import codec, pki
from vaultrpc.tls import secure_channel

SUITE = "wan"
DELAY_MS = 5.0
RELAY = pathlib.Path(__file__).resolve().parent.parent / "tools" / "delay_relay.py"
BASELINE = ("single custody, 5 ms each way between hosts: verifier fetching the whole template from one store "
            "(same stack, mTLS, matching)")
ONE_HOP = "one hop, 5 ms each way: verifier holding the templates in memory (same stack, mTLS, matching)"


def _relay(procs: sv.Processes, name: str, routes: dict[str, str], delay_ms: float) -> dict[str, str]:
    """Start a relay process with one loopback route per target; name -> relayed address."""
    ready = procs.root / f"{name}.ready"
    argv = [str(RELAY), "--delay-ms", str(delay_ms), "--ready", str(ready)]
    for target in routes.values():
        argv += ["--route", f"127.0.0.1:0={target}"]
    procs._spawn(name, argv)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if procs.procs[name].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"relay {name} did not start: {(procs.root / f'{name}.log').read_text()[-1500:]}")
        time.sleep(0.05)
    bound = json.loads(ready.read_text())["routes"]
    return {key: route["listen"] for key, route in zip(routes, bound)}


def _start_far(procs: sv.Processes, addresses: dict[str, str], delay_ms: float) -> dict[str, str]:
    """A matcher and a single-custody verifier whose back ends are behind
    relays, themselves reached through relays; returns the provider's addresses."""
    back = _relay(procs, "relay_back", {**{n: addresses[n] for n in sv.NODES}, "store": addresses["store"]}, delay_ms)
    text = (procs.root / "matcher.toml").read_text()
    for n in sv.NODES:
        text = text.replace(f'address = "{addresses[n]}"', f'address = "{back[n]}"')
    text = text.replace(str(procs.root / "matcher.ready"), str(procs.root / "matcher_far.ready"))
    assert all(f'address = "{back[n]}"' in text for n in sv.NODES)
    (procs.root / "matcher_far.toml").write_text(text)
    procs._spawn("matcher_far", ["-m", "matcher", "--config", str(procs.root / "matcher_far.toml")])
    m = procs.files[("matcher", "matcher")]
    procs._spawn("verifier_far", ["-m", "bench.suite_verify", "serve", "--kind", "verifier", "--ca", m.ca, "--cert",
                                  m.cert, "--key", m.key, "--store", back["store"],
                                  "--ready", str(procs.root / "verifier_far.ready")])
    far = {"matcher": procs._ready("matcher_far", procs.root / "matcher_far.ready"),
           "verifier": procs._ready("verifier_far", procs.root / "verifier_far.ready"),
           "memory": addresses["memory"]}
    return _relay(procs, "relay_front", far, delay_ms)


def _measure(quick: bool, delay_ms: float) -> tuple[dict, dict, dict, int]:
    """Latencies (s) of the three systems with ``delay_ms`` each way between hosts."""
    subjects = 1_000 if quick else 3_000
    calls = 200 if quick else 600
    templates, probes = sv._gallery(subjects)
    codes = codec.encode(templates, sv.DIM)
    with tempfile.TemporaryDirectory(prefix="splitvault-bench-wan-") as tmp:
        procs = sv.Processes(pathlib.Path(tmp))
        try:
            addresses = procs.start()
            # The gallery, directly: into the nodes through the near matcher,
            # into the store and the one-hop verifier as int8 codes.
            near = sv._Systems(procs, addresses, probes)
            try:
                failed = sum(1 for r in near.client.enroll_many((f"s{i}", templates[i]) for i in range(subjects)) if r.code)
            finally:
                near.close()
            for service, target, files, expect in (
                (sv.STORE_SERVICE, "store", procs.files[("matcher", "matcher")], pki.Identity("shareholder", "store")),
                (sv.VERIFIER_SERVICE, "memory", procs.files[("psp", sv.TENANT)], sv.MEMORY),
            ):
                put = sv._Stub(secure_channel(addresses[target], files.load(), expect=expect), service, "Put",
                               shareholder_pb2.StoreSharesRequest, shareholder_pb2.StoreSharesResponse)
                for lo in range(0, subjects, sv.ENROLL_BATCH):
                    batch = [common_pb2.ShareRecord(tenant=sv.TENANT, subject=f"s{i}", dimension=sv.DIM,
                                                    values=codes[i].tobytes())
                             for i in range(lo, min(lo + sv.ENROLL_BATCH, subjects))]
                    put(shareholder_pb2.StoreSharesRequest(records=batch), 30.0)
                put.channel.close()

            systems = sv._Systems(procs, _start_far(procs, addresses, delay_ms), probes)
            try:
                names = ("split", "single", "one_hop")
                sv._latencies(systems, names, 30, subjects, 0)  # warm every channel through the relays
                lat, errors, matches, _, _ = sv._latencies(systems, names, calls, subjects, 90)
            finally:
                systems.close()
        finally:
            procs.close()
    return lat, errors, matches, failed


def run(quick: bool) -> list[dict]:
    load_before = round(os.getloadavg()[0], 2)
    # The same relays with no delay first: what the relays themselves cost,
    # so that the second run's difference is what the distance costs.
    near, _, _, _ = _measure(quick, 0.0)
    lat, errors, matches, failed = _measure(quick, DELAY_MS)
    p = {name: (sv._percentile(v, 50) * 1000, sv._percentile(v, 99) * 1000) for name, v in lat.items()}
    p0 = {name: sv._percentile(v, 50) * 1000 for name, v in near.items()}
    common = {"n": len(sv.NODES), "k": sv.K, "dim": sv.DIM, "one_way_delay_ms": DELAY_MS, "calls": len(lat["split"]),
              "concurrency": 1, "enrol_failed": failed, "errors": errors["split"],
              "baseline_errors": errors["single"],
              "genuine_match_rate": round(matches["split"] / max(1, len(lat["split"])), 4),
              "one_round_trip_ms": 2 * DELAY_MS, "p50_through_relays_without_delay_ms":
                  {k: round(v, 2) for k, v in p0.items()}, "loadavg_1m_before": load_before}

    def result(name, value, baseline, baseline_value):
        return {**sv._result(name, common, value, "ms", baseline, baseline_value, False), "suite": SUITE}

    return [
        result("wan_verify_p50", p["split"][0], BASELINE, p["single"][0]),
        result("wan_verify_p99", p["split"][1], BASELINE, p["single"][1]),
        result("wan_verify_p50_vs_one_hop", p["split"][0], ONE_HOP, p["one_hop"][0]),
        # What 5 ms between hosts adds to the p50 (over the same relays at 0 ms):
        # two sequential round trips (20 ms) is the floor for both designs.
        result("wan_distance_cost_p50", p["split"][0] - p0["split"], BASELINE + "; the same difference",
               p["single"][0] - p0["single"]),
    ]


METHOD = __doc__.split("\n\n", 1)[1].strip()


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
