"""The checked-in zds/gen/ must match proto/: regenerate and compare."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import grpc_tools  # (a dev dependency: missing, the module fails to load)
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from tests.harness import ROOT
from tools.genproto import PROTO_DIR, generate
from zds.gen import nodeagent_pb2, zds_pb2


def compiled_descriptors(tmp_path: pathlib.Path) -> dict[str, bytes]:

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out = tmp_path / "set.pb"
    sources = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    assert (
        protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--descriptor_set_out={out}", *sources])
        == 0
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for f in fds.file:
        # protoc's descriptor set spells out json_name; the embedded descriptors omit it.
        for message in f.message_type:
            for field in message.field:
                field.ClearField("json_name")
    return {f.name: f.SerializeToString() for f in fds.file}


def test_generated_descriptors_match_proto_sources(tmp_path: pathlib.Path) -> None:
    compiled = compiled_descriptors(tmp_path)
    assert set(compiled) == {"zds.proto", "nodeagent.proto"}
    for module in (zds_pb2, nodeagent_pb2):
        checked_in = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        fresh = descriptor_pb2.FileDescriptorProto.FromString(compiled[checked_in.name])
        assert checked_in == fresh, f"zds/gen is stale for {checked_in.name}: run python -m tools.genproto"


def test_the_generator_takes_a_flag_for_a_flag(tmp_path: pathlib.Path) -> None:
    """``python -m tools.genproto --help`` generated the modules into a directory ``--help``."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.genproto", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m tools.genproto [-h] [outdir]")
    assert list(tmp_path.iterdir()) == []


def test_generated_grpc_stubs_match_proto_sources(tmp_path: pathlib.Path) -> None:
    generate(tmp_path)
    pattern = re.compile(r"'(/[\w.]+/\w+)'")
    fresh = set(pattern.findall((tmp_path / "nodeagent_pb2_grpc.py").read_text()))
    checked_in = set(pattern.findall((ROOT / "zds" / "gen" / "nodeagent_pb2_grpc.py").read_text()))
    assert fresh and fresh == checked_in


def test_wire_schema_keeps_istios_names_and_numbers() -> None:
    req = zds_pb2.WorkloadRequest.DESCRIPTOR
    assert zds_pb2.DESCRIPTOR.package == "istio.workload.zds"
    assert {f.name: f.number for f in req.fields} == {"add": 1, "keep": 5, "del": 2, "snapshot_sent": 3}
    assert zds_pb2.DelWorkload.DESCRIPTOR.fields_by_name["uid"].number == 2
    info = zds_pb2.WorkloadInfo.DESCRIPTOR
    assert {f.name: f.number for f in info.fields} == {"name": 1, "namespace": 2, "service_account": 3}
