"""The fuzz targets (fuzz/, atheris) run for a minute each, from seeds that go deep, and
find nothing (an uncaught exception or a broken invariant would be a crash file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import seeds
from fuzz.seeds import TARGETS
from tests.harness import ROOT

SECONDS = 60


def run(target: str, corpus: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "fuzz" / f"{target}.py"), str(corpus), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=corpus.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # (this checkout's zds, whatever the venv's is)
    )


@pytest.mark.slow
def test_every_fuzz_target_runs_a_minute_and_finds_nothing(tmp_path: Path) -> None:
    running = {}
    for target in TARGETS:
        corpus = tmp_path / target / "corpus"
        seeds.write(target, corpus)
        running[target] = run(
            target,
            corpus,
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path / target}/",
            "-rss_limit_mb=2048",
        )
    try:
        for target, proc in running.items():
            out, _ = proc.communicate(timeout=SECONDS * 4)
            crashes = [
                p.name
                for p in (tmp_path / target).iterdir()
                if p.name.startswith(("crash-", "oom-", "timeout-"))
            ]
            assert proc.returncode == 0 and not crashes, f"{target} found something:\n{out[-4000:]}"
            assert "Done" in out and "runs in" in out, out[-2000:]
    finally:  # (a failed target left the others running)
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
