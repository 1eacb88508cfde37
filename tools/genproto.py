"""Regenerate zds/gen/ from proto/ (python -m tools.genproto [OUTDIR]).

The generated modules are checked in; tests/test_generated_code.py fails when
they drift from proto/.
"""

from __future__ import annotations

import argparse
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.glob("*.proto"))
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # protoc writes top-level imports ("import nodeagent_pb2"); make them package-relative.
    for path in out.glob("*_pb2*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.M)
        path.write_text(fixed)
    init = out / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf/gRPC modules (tools/genproto.py); do not edit."""\n')


def main(argv: list[str] | None = None) -> None:
    """``python -m tools.genproto [OUTDIR]``: a flag is a flag (``--help`` had generated the
    modules into a directory named ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m tools.genproto", description=__doc__.splitlines()[0])
    parser.add_argument(
        "outdir", nargs="?", type=pathlib.Path, default=ROOT / "zds" / "gen", help="(default: zds/gen)"
    )
    generate(parser.parse_args(argv).outdir)


if __name__ == "__main__":
    main()
