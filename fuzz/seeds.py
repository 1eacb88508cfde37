"""Seeds for the fuzz targets: inputs that already go deep (without them a target starting
from an empty corpus stalls at the first parse: cni_event at coverage 51 after 18 million
runs). ``python fuzz/seeds.py TARGET DIR`` writes TARGET's into DIR (tests/test_fuzz.py and a
long campaign, fuzz/README.md, start from them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("zds_decoder", "cni_event", "pods_file", "control_request")


def samples(target: str) -> list[bytes]:
    """``target``'s seeds."""
    if target == "zds_decoder":  # every golden wire vector (tests/data, from ../shared/vectors)
        rows = (ROOT / "tests" / "data" / "zds-wire.tsv").read_text().splitlines()
        return [b"\x00\x00" + bytes.fromhex(r.split("\t")[3]) for r in rows if r.strip() and r[0] != "#"]
    if target == "cni_event":
        body = {"Netns": "/var/run/netns/a", "PodName": "web", "PodNamespace": "shop"}
        ips = [{"Interface": 0, "Address": {"IP": "10.0.0.5", "Mask": "////AA=="}, "Gateway": "10.0.0.1"}]
        return [json.dumps(body).encode(), json.dumps({**body, "IPs": ips, "PodUID": "u1"}).encode()]
    if target == "control_request":
        from zds.gen import nodeagent_pb2
        from zds.server import bulkwire

        pods = [
            nodeagent_pb2.AddPodRequest(uid="u1", name="a", namespace="ns", netns_path="/var/run/netns/a"),
            nodeagent_pb2.AddPodRequest(uid="u2", netns_pid=42, ips=["10.0.0.5", "fd00::5"]),
        ]
        framed = bulkwire.frame(nodeagent_pb2.AddPodsRequest(pods=pods).SerializeToString())
        as_json = [
            {"uid": "u1", "name": "a", "namespace": "ns", "netns_path": "/var/run/netns/a"},
            {"uid": "u2", "netns_pid": 42, "ips": ["10.0.0.5", "fd00::5"]},
        ]
        in_json = bulkwire.frame(json.dumps(as_json).encode())
        return [
            b"\x01\x00" + framed,
            b"\x01\x02\x03\x07" + framed * 2,
            b"\x00" + bulkwire.MAGIC + framed,
            b"\x02\x00" + in_json,
            b"\x02\x02\x03\x07" + in_json * 2,
        ]
    if target == "pods_file":
        line = {"uid": "u1", "name": "a", "namespace": "ns", "service_account": "sa", "netns": "pid:42"}
        return [
            json.dumps(line).encode(),
            b"pods:\n- uid: u1\n  netns: /var/run/netns/a\n  ips: [10.0.0.5]\n",
            json.dumps([line]).encode(),
        ]
    raise ValueError(f"unknown fuzz target {target!r}; one of {', '.join(TARGETS)}")


def write(target: str, corpus: Path) -> None:
    """``target``'s seeds into ``corpus`` (made if missing)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for n, sample in enumerate(samples(target)):
        (corpus / f"seed-{n}").write_bytes(sample)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} DIR")
    write(sys.argv[1], Path(sys.argv[2]))
