"""zds.server, zds.client and zds.netns import from a built wheel, not only from the checkout."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.harness import ROOT


@pytest.mark.slow
def test_wheel_installs_every_subpackage_under_zds(tmp_path: pathlib.Path) -> None:
    # Build from a copy so the checkout gets no build/ directory.
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)
    pip = [sys.executable, "-m", "pip"]
    wheel_cmd = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)]
    subprocess.run(wheel_cmd, check=True, timeout=300, cwd=tmp_path)
    [wheel] = tmp_path.glob("zds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("zds/gen/zds_pb2.pyi", "zds/py.typed"):
        assert module in names
    # Every module of the source tree is in the wheel (a package missing from pyproject's
    # list would install a zds that cannot even build its parser).
    sources = {
        os.path.relpath(os.path.join(directory, name), ROOT)
        for directory, _, files in os.walk(ROOT / "zds", followlinks=True)  # zds/server -> server/
        if "__pycache__" not in directory
        for name in files
        if name.endswith(".py")
    }
    assert "zds/server/agent.py" in sources and "zds/demo/story.py" in sources
    assert sorted(sources - names) == []
    assert not any(
        n.startswith(("server/", "client/", "netns/")) for n in names
    )  # no bare top-level packages
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    # Run from an empty directory with only the installed copy ahead of the venv on the path.
    code = "import zds.server.agent, zds.client, zds.netns, zds.cli, zds; print(zds.server.agent.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip().startswith(str(target))
    help_out = subprocess.run(
        [sys.executable, "-m", "zds", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_out.returncode == 0 and "server" in help_out.stdout


@pytest.mark.parametrize("package", ["server", "client", "netns"])
def test_a_bare_top_level_import_from_the_repository_root_is_refused(package: str) -> None:
    """server/, client/ and netns/ are zds.server, zds.client and zds.netns: one copy of each module."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {package}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last == f"ImportError: import zds.{package}, not {package}: {package}/ is the package zds.{package}"
    )


def test_the_zds_package_and_the_top_level_directories_are_the_same_files() -> None:
    for package in ("server", "client", "netns"):
        assert (ROOT / "zds" / package).resolve() == (ROOT / package).resolve()
