"""The fuzz targets (fuzz/, atheris) run for a minute each, from seeds that go deep, and
find nothing (an uncaught exception or a broken invariant would be a crash file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, wire_vectors
from zds.gen import nodeagent_pb2
from zds.server import bulkwire

SECONDS = 60
TARGETS = ("zds_decoder", "cni_event", "pods_file", "control_request")


def seed(corpus: Path, target: str) -> None:
    """Start each target from inputs that already go deep."""
    corpus.mkdir(parents=True)
    if target == "zds_decoder":
        samples = [b"\x00\x00" + data for *_, data in wire_vectors()]
    elif target == "cni_event":
        body = {"Netns": "/var/run/netns/a", "PodName": "web", "PodNamespace": "shop"}
        ips = [{"Interface": 0, "Address": {"IP": "10.0.0.5", "Mask": "////AA=="}, "Gateway": "10.0.0.1"}]
        samples = [json.dumps(body).encode(), json.dumps({**body, "IPs": ips, "PodUID": "u1"}).encode()]
    elif target == "control_request":
        pods = [
            nodeagent_pb2.AddPodRequest(uid="u1", name="a", namespace="ns", netns_path="/var/run/netns/a"),
            nodeagent_pb2.AddPodRequest(uid="u2", netns_pid=42, ips=["10.0.0.5", "fd00::5"]),
        ]
        framed = bulkwire.frame(nodeagent_pb2.AddPodsRequest(pods=pods).SerializeToString())
        samples = [b"\x01\x00" + framed, b"\x01\x02\x03\x07" + framed * 2, b"\x00" + bulkwire.MAGIC + framed]
    else:
        line = {"uid": "u1", "name": "a", "namespace": "ns", "service_account": "sa", "netns": "pid:42"}
        samples = [
            json.dumps(line).encode(),
            b"pods:\n- uid: u1\n  netns: /var/run/netns/a\n  ips: [10.0.0.5]\n",
            json.dumps([line]).encode(),
        ]
    for n, sample in enumerate(samples):
        (corpus / f"seed-{n}").write_bytes(sample)


def run(target: str, corpus: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "fuzz" / f"{target}.py"), str(corpus), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=corpus.parent,
    )


@pytest.mark.slow
def test_every_fuzz_target_runs_a_minute_and_finds_nothing(tmp_path: Path) -> None:
    running = {}
    for target in TARGETS:
        corpus = tmp_path / target / "corpus"
        seed(corpus, target)
        running[target] = run(
            target,
            corpus,
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path / target}/",
            "-rss_limit_mb=2048",
        )
    for target, proc in running.items():
        out, _ = proc.communicate(timeout=SECONDS * 4)
        crashes = [
            p.name for p in (tmp_path / target).iterdir() if p.name.startswith(("crash-", "oom-", "timeout-"))
        ]
        assert proc.returncode == 0 and not crashes, f"{target} found something:\n{out[-4000:]}"
        assert "Done" in out and "runs in" in out, out[-2000:]
