"""zds cni install|uninstall: the plugin into a bin dir, chained into a network's conflist,
and nothing else in the platform engineer's files changed."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import zds
from tests.harness import ZDS
from zds.cni.launcher import InstallError, check_python, launcher

#: A conflist as `podman network create` writes it (3-space indent, no final newline).
PODMAN_CONFLIST = """{
   "cniVersion": "0.4.0",
   "name": "mesh",
   "plugins": [
      {
         "type": "bridge",
         "bridge": "cni-podman1",
         "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": "10.213.0.0/24", "gateway": "10.213.0.1" }]]
         }
      },
      {
         "type": "portmap",
         "capabilities": {
            "portMappings": true
         }
      }
   ]
}"""
OTHER = '{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge","bridge":"x0"}]}\n'


def zds_cni(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZDS, "cni", *args], capture_output=True, text=True, timeout=60)


def dirs(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    return bin_dir, conf_dir, ["--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)]


def test_install_chains_last_and_changes_nothing_else_and_uninstall_restores_the_bytes(
    tmp_path: pathlib.Path,
) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    mesh = conf_dir / "87-mesh.conflist"
    mesh.write_text(PODMAN_CONFLIST)
    mesh.chmod(0o640)
    (conf_dir / "10-other.conflist").write_text(OTHER)
    done = zds_cni("install", *flags, "--network", "mesh", "--cni-socket", "/run/zds/cni.sock")
    assert done.returncode == 0, done.stderr
    assert f"chained zds-cni into {mesh}" in done.stdout
    text = mesh.read_text()
    doc = json.loads(text)
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "portmap", "zds-cni"]
    assert doc["plugins"][-1] == {
        "type": "zds-cni",
        "cni_socket": "/run/zds/cni.sock",
        "log_file": "/var/log/zds-cni.log",
    }
    # The rest is the same text, byte for byte, and the new entry is laid out like its neighbours.
    assert text.startswith(PODMAN_CONFLIST.removesuffix("\n   ]\n}") + ",\n")
    assert '\n      {\n         "type": "zds-cni",' in text and text.endswith("   ]\n}")
    assert (mesh.stat().st_mode & 0o777) == 0o640
    assert (conf_dir / "10-other.conflist").read_text() == OTHER
    assert not [p for p in os.listdir(conf_dir) if ".tmp." in p]

    # Again: nothing to do, nothing rewritten.
    inode, mtime = mesh.stat().st_ino, mesh.stat().st_mtime_ns
    again = zds_cni("install", *flags, "--network", "mesh", "--cni-socket", "/run/zds/cni.sock")
    assert "already chained, unchanged" in again.stdout and "up to date" in again.stdout
    assert (mesh.stat().st_ino, mesh.stat().st_mtime_ns) == (inode, mtime)

    # Other options: the entry is replaced, still last; what no flag gives stays as it was
    # (the socket given before, keys set by hand).
    mesh.write_text(mesh.read_text().replace('"type": "zds-cni",', '"type": "zds-cni", "timeout": 5,'))
    zds_cni("install", *flags, "--network", "mesh", "--enroll", "all")
    plugins = json.loads(mesh.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "portmap", "zds-cni"] and plugins[-1]["enroll"] == "all"
    assert plugins[-1]["timeout"] == 5 and plugins[-1]["cni_socket"] == "/run/zds/cni.sock"
    inode = mesh.stat().st_ino
    again = zds_cni("install", *flags, "--network", "mesh")  # (an upgrade's reinstall: all stays)
    assert "already chained, unchanged" in again.stdout and mesh.stat().st_ino == inode
    zds_cni("install", *flags, "--network", "mesh", "--enroll", "labelled")  # ("enroll" goes)
    assert json.loads(mesh.read_text())["plugins"][-1] == {
        "type": "zds-cni",
        "cni_socket": "/run/zds/cni.sock",
        "log_file": "/var/log/zds-cni.log",
        "timeout": 5,
    }
    # Istio's cni_agent_run_dir in place of cni_socket (the socket is its pluginevent.sock):
    # a reinstall writes no cni_socket over it.
    mesh.write_text(
        mesh.read_text().replace('"cni_socket": "/run/zds/cni.sock"', '"cni_agent_run_dir": "/run/zds"')
    )
    zds_cni("install", *flags, "--network", "mesh", "--enroll", "all")
    entry = json.loads(mesh.read_text())["plugins"][-1]
    assert entry["cni_agent_run_dir"] == "/run/zds" and "cni_socket" not in entry and entry["enroll"] == "all"
    zds_cni(
        "install", *flags, "--network", "mesh", "--enroll", "labelled", "--cni-socket", "/run/zds/cni.sock"
    )
    # A key set by hand that zds-cni would refuse: said, nothing written.
    mesh.write_text(mesh.read_text().replace('"timeout": 5', '"timeout": "30"'))
    before = mesh.read_text()
    refused = zds_cni("install", *flags, "--network", "mesh")
    assert refused.returncode == 1 and "zds-cni's entry would not load: timeout '30'" in refused.stderr
    assert mesh.read_text() == before
    mesh.write_text(before.replace('"timeout": "30"', '"timeout": 5'))

    gone = zds_cni("uninstall", *flags)
    assert gone.returncode == 0, gone.stderr
    assert mesh.read_text() == PODMAN_CONFLIST
    assert (mesh.stat().st_mode & 0o777) == 0o640
    assert os.listdir(bin_dir) == []


def test_a_conflist_with_crlf_line_ends_keeps_them_and_comes_back_byte_for_byte(
    tmp_path: pathlib.Path,
) -> None:
    _, conf_dir, flags = dirs(tmp_path)
    mesh = conf_dir / "87-mesh.conflist"
    original = PODMAN_CONFLIST.replace("\n", "\r\n").encode()
    mesh.write_bytes(original)
    assert zds_cni("install", *flags, "--network", "mesh").returncode == 0
    chained = mesh.read_bytes()
    assert json.loads(chained)["plugins"][-1]["type"] == "zds-cni"
    assert b"\n" not in chained.replace(b"\r\n", b""), "a line end that is not CRLF"
    assert zds_cni("uninstall", *flags).returncode == 0
    assert mesh.read_bytes() == original


def test_a_network_whose_cni_version_zds_cni_does_not_speak_is_not_chained(tmp_path: pathlib.Path) -> None:
    """Chained, every container on it would fail to start (zds-cni refuses its config)."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    old = '{"cniVersion": "0.2.0", "name": "old", "plugins": [{"type": "bridge", "bridge": "x0"}]}\n'
    (conf_dir / "10-old.conflist").write_text(old)
    done = zds_cni("install", *flags, "--network", "old")
    assert done.returncode == 1, done.stdout
    [line] = done.stderr.splitlines()
    assert "has cniVersion '0.2.0', which zds-cni does not speak" in line and line.endswith(
        "nothing was changed"
    )
    assert (conf_dir / "10-old.conflist").read_text() == old and os.listdir(bin_dir) == []


def test_the_installed_plugin_runs_from_the_bin_dir(tmp_path: pathlib.Path) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    assert zds_cni("install", *flags).returncode == 0
    plugin = bin_dir / "zds-cni"
    assert os.access(plugin, os.X_OK) and (plugin.stat().st_mode & 0o777) == 0o755
    # As a runtime runs it: its own path, a bare environment, from another directory.
    done = subprocess.run(
        [str(plugin)],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        cwd="/",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["supportedVersions"][-2:] == ["1.0.0", "1.1.0"]


def test_relative_dirs_are_taken_from_where_the_command_runs(tmp_path: pathlib.Path) -> None:
    """``--bin-dir bin``: the launcher's check ran it from /, where bin/zds-cni is not."""
    bin_dir, conf_dir, _ = dirs(tmp_path)
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    relative = ["--bin-dir", "bin", "--conf-dir", "net.d"]
    done = subprocess.run(
        [*ZDS, "cni", "install", *relative], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (
        os.access(bin_dir / "zds-cni", os.X_OK) and "zds-cni" in (conf_dir / "87-mesh.conflist").read_text()
    )
    done = subprocess.run(
        [*ZDS, "cni", "uninstall", *relative], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (
        not (bin_dir / "zds-cni").exists() and (conf_dir / "87-mesh.conflist").read_text() == PODMAN_CONFLIST
    )


#: A Python that cannot import zds when run as a CNI runtime runs the launcher (isolated, -I):
#: Debian's own, which ./dev made the venv from, with zds found only through PYTHONPATH.
SYSTEM_PYTHON = "/usr/bin/python3"


def test_a_python_that_cannot_import_zds_isolated_is_refused_and_nothing_is_written(
    tmp_path: pathlib.Path,
) -> None:
    """zds run from a checkout through PYTHONPATH (or a user site) installed a launcher that
    could not import zds: every ADD and DEL on that network a traceback, the install "done"."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    site = subprocess.run(
        [sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    checkout = str(pathlib.Path(zds.__file__).resolve().parent.parent)
    done = subprocess.run(
        [SYSTEM_PYTHON, "-m", "zds", "cni", "install", *flags],
        env={**os.environ, "PYTHONPATH": f"{checkout}:{site}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(
        f"zds cni install: {SYSTEM_PYTHON} -I cannot import zds (ModuleNotFoundError"
    )
    assert "a CNI runtime runs the plugin that way" in done.stderr and len(done.stderr.splitlines()) == 1
    assert os.listdir(bin_dir) == [] and (conf_dir / "87-mesh.conflist").read_text() == PODMAN_CONFLIST


def test_an_interpreter_path_the_kernel_cannot_run_as_a_launcher_line_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    """A space splits a #! line (the kernel ran "/opt/my" with "venv/bin/python -I"), and Linux
    runs at most 255 bytes of it: every ADD and DEL failed to exec, the install "done"."""
    for python in ("/opt/my venv/bin/python", "/" + "p" * 260):
        with pytest.raises(InstallError, match="cannot be the launcher's #! line"):
            check_python(python)
    # A path that is not UTF-8 (a venv under such a directory): a UnicodeEncodeError traceback.
    with pytest.raises(InstallError, match=r"^/opt/\\xff/bin/python: the path of Python is not UTF-8 text"):
        check_python(os.fsdecode(b"/opt/\xff/bin/python"))


@pytest.mark.root  # (mount)
def test_a_launcher_the_bin_dir_will_not_run_is_taken_back_and_nothing_chained(
    tmp_path: pathlib.Path,
) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=1m", "zds-test", str(bin_dir)], check=True)
    try:
        done = zds_cni("install", *flags)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert f"the launcher {bin_dir / 'zds-cni'} does not run: [Errno 13] Permission denied" in done.stderr
        assert os.listdir(bin_dir) == [] and (conf_dir / "87-mesh.conflist").read_text() == PODMAN_CONFLIST
    finally:
        subprocess.run(["umount", str(bin_dir)], check=True)


def test_a_launcher_that_cannot_load_zds_says_so_as_the_spec_asks_and_lets_a_del_succeed(
    tmp_path: pathlib.Path,
) -> None:
    plugin = tmp_path / "zds-cni"
    plugin.write_text(launcher(SYSTEM_PYTHON))
    plugin.chmod(0o755)

    def run(command: str) -> subprocess.CompletedProcess[bytes]:
        env = {"CNI_COMMAND": command, "PATH": "/usr/bin:/bin"}
        conf = b'{"cniVersion": "0.4.0", "name": "n", "type": "zds-cni"}'
        return subprocess.run([str(plugin)], input=conf, env=env, cwd="/", capture_output=True, timeout=60)

    added = run("ADD")
    assert added.returncode == 1 and added.stderr == b""
    said = json.loads(added.stdout)
    assert said["code"] == 999 and said["msg"] == "zds-cni: cannot load zds: No module named 'zds'"
    assert said["details"].startswith(SYSTEM_PYTHON) and set(said) == {"cniVersion", "code", "msg", "details"}
    assert said["cniVersion"] == "0.4.0"  # (the config's)
    deleted = run("DEL")
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (0, b"", b"")


def test_a_conflist_of_zds_cni_alone_is_neither_chained_into_nor_emptied(tmp_path: pathlib.Path) -> None:
    """Install was a traceback (an empty plugins list) that left its launcher; uninstall wrote
    ``"plugins": []``, which libcni refuses."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    alone = '{"cniVersion": "1.0.0", "name": "mesh", "plugins": [{"type": "zds-cni", "cni_socket": "/x"}]}\n'
    (conf_dir / "87-mesh.conflist").write_text(alone)
    done = zds_cni("install", *flags)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "network 'mesh' has no plugin but zds-cni" in done.stderr and "Traceback" not in done.stderr
    assert os.listdir(bin_dir) == [] and (conf_dir / "87-mesh.conflist").read_text() == alone
    (conf_dir / "10-other.conflist").write_text(OTHER)
    assert zds_cni("install", *flags, "--network", "other").returncode == 0
    done = zds_cni("uninstall", *flags)
    assert done.returncode == 0 and "zds-cni is its only plugin" in done.stdout
    assert (conf_dir / "87-mesh.conflist").read_text() == alone
    assert (conf_dir / "10-other.conflist").read_text() == OTHER
    # (the network it is left in still runs it: the launcher stays)
    assert f"kept {bin_dir / 'zds-cni'}: zds-cni is still chained into 'mesh'" in done.stdout
    assert (bin_dir / "zds-cni").exists()


@pytest.mark.root  # (chown)
def test_a_single_plugin_conf_becomes_a_conflist_and_comes_back(tmp_path: pathlib.Path) -> None:
    _, conf_dir, flags = dirs(tmp_path)
    conf = conf_dir / "10-bridge.conf"
    original = '{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "cni0"}\n'
    conf.write_text(original)
    conf.chmod(0o640)
    os.chown(conf, 4242, 4343)  # (tests run as root; the conflist made from it was root's)
    assert zds_cni("install", *flags).returncode == 0
    assert not conf.exists()
    made = (conf_dir / "10-bridge.conflist").stat()
    assert (made.st_mode & 0o777, made.st_uid, made.st_gid) == (0o640, 4242, 4343)
    doc = json.loads((conf_dir / "10-bridge.conflist").read_text())
    assert doc["name"] == "k8s" and doc["cniVersion"] == "0.3.1"
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "zds-cni"]
    assert zds_cni("uninstall", *flags).returncode == 0
    assert conf.read_text() == original and sorted(os.listdir(conf_dir)) == ["10-bridge.conf"]


def test_a_conf_is_not_converted_over_an_original_an_earlier_install_left_beside_it(
    tmp_path: pathlib.Path,
) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    conf = conf_dir / "10-bridge.conf"
    now = '{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "cni0"}\n'
    conf.write_text(now)
    kept = conf_dir / "10-bridge.conf.zds-cni-orig"
    kept.write_text(now.replace("cni0", "cni9"))  # an earlier round's original, kept by its uninstall
    done = zds_cni("install", *flags)
    assert done.returncode == 1 and f"{kept} exists already" in done.stderr, done.stderr
    assert conf.read_text() == now and kept.read_text() == now.replace("cni0", "cni9")
    assert sorted(os.listdir(conf_dir)) == ["10-bridge.conf", "10-bridge.conf.zds-cni-orig"]
    assert os.listdir(bin_dir) == [], "a failed install left its launcher"


@pytest.mark.parametrize("signum", [15, 1])
def test_a_sigterm_or_sighup_mid_install_or_uninstall_waits_for_its_end_and_leaves_no_temporary_file(
    tmp_path: pathlib.Path, signum: int
) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    conf = conf_dir / "10-bridge.conf"
    original = '{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "cni0"}\n'
    conf.write_text(original)
    # The signal comes in the middle: install's as the conflist's temporary file is synced (the
    # launcher's is the first fsync, the conf dir's the second), uninstall's as it renames the
    # kept .conf back (its .conflist not removed yet).
    code = (
        "import os, signal, sys\n"
        "name, nth = sys.argv[1], int(sys.argv[2])\n"
        "real, calls = getattr(os, name), []\n"
        "def hooked(*args):\n"
        "    calls.append(args)\n"
        "    if len(calls) == nth:\n"
        f"        os.kill(os.getpid(), {signum})\n"
        "    return real(*args)\n"
        "setattr(os, name, hooked)\n"
        "from zds.cli import main\n"
        "sys.exit(main(sys.argv[3:]))\n"
    )
    for command, hook in (("install", ["fsync", "3"]), ("uninstall", ["rename", "1"])):
        done = subprocess.run(
            [sys.executable, "-c", code, *hook, "cni", command, *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 128 + signum, (command, done.returncode, done.stderr)
        assert not [n for n in os.listdir(conf_dir) + os.listdir(bin_dir) if ".tmp." in n], command
        if command == "install":  # done whole: the .conf became the .conflist, the launcher is there
            assert sorted(os.listdir(conf_dir)) == ["10-bridge.conf.zds-cni-orig", "10-bridge.conflist"]
            assert os.listdir(bin_dir) == ["zds-cni"]
    assert sorted(os.listdir(conf_dir)) == ["10-bridge.conf"] and conf.read_text() == original
    assert os.listdir(bin_dir) == []


def test_a_converted_conf_edited_since_keeps_its_edits_and_its_original_is_named(
    tmp_path: pathlib.Path,
) -> None:
    _, conf_dir, flags = dirs(tmp_path)
    conf = conf_dir / "10-bridge.conf"
    conf.write_text('{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "cni0"}\n')
    assert zds_cni("install", *flags).returncode == 0
    conflist = conf_dir / "10-bridge.conflist"
    conflist.write_text(conflist.read_text().replace('"cni0"', '"cni1"'))  # someone's edit
    done = zds_cni("uninstall", *flags)
    assert done.returncode == 0, done.stderr
    original = conf_dir / "10-bridge.conf.zds-cni-orig"
    assert done.stdout.splitlines()[0] == (
        f"took zds-cni out of {conflist} ({original} kept: {conflist} was edited since the install)"
    )
    assert [p["bridge"] for p in json.loads(conflist.read_text())["plugins"]] == ["cni1"]
    assert original.exists() and not conf.exists()


def test_what_it_cannot_do_is_said_in_one_line_and_nothing_is_touched(tmp_path: pathlib.Path) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    done = zds_cni("install", *flags)
    assert done.returncode == 1 and done.stderr.startswith("zds cni install: no network config in")
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    done = zds_cni("install", *flags, "--network", "nope")
    assert done.returncode == 1 and "no network named 'nope'" in done.stderr
    assert os.listdir(bin_dir) == [], "a failed install wrote the launcher"
    (bin_dir / "zds-cni").write_text("#!/bin/sh\necho someone else's\n")
    done = zds_cni("install", *flags)
    assert done.returncode == 1 and "is not zds-cni's launcher" in done.stderr
    assert (conf_dir / "87-mesh.conflist").read_text() == PODMAN_CONFLIST
    assert (bin_dir / "zds-cni").read_text() == "#!/bin/sh\necho someone else's\n"
    done = zds_cni("uninstall", *flags)
    assert (
        done.returncode == 0
        and done.stdout == f"left {bin_dir / 'zds-cni'} in place: it is not zds-cni's launcher\n"
    )
    assert (bin_dir / "zds-cni").exists()


def test_uninstall_takes_zds_cni_out_beside_another_programs_binary_and_says_what_it_did(
    tmp_path: pathlib.Path,
) -> None:
    """The binary in the bin dir became another program's since the install: uninstall
    failed on it, after taking zds-cni out of the configs, and said nothing of that."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    mesh = conf_dir / "87-mesh.conflist"
    mesh.write_text(PODMAN_CONFLIST)
    assert zds_cni("install", *flags).returncode == 0
    (bin_dir / "zds-cni").write_text("#!/bin/sh\necho someone else's\n")
    done = zds_cni("uninstall", *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"took zds-cni out of {mesh}",
        f"left {bin_dir / 'zds-cni'} in place: it is not zds-cni's launcher",
    ]
    assert mesh.read_text() == PODMAN_CONFLIST
    assert (bin_dir / "zds-cni").read_text() == "#!/bin/sh\necho someone else's\n"


def test_uninstall_leaves_a_conf_someone_wrote_since_and_keeps_a_symlinked_conflist_a_symlink(
    tmp_path: pathlib.Path,
) -> None:
    _, conf_dir, flags = dirs(tmp_path)
    conf = conf_dir / "10-bridge.conf"
    conf.write_text('{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "cni0"}\n')
    assert zds_cni("install", *flags).returncode == 0
    theirs = '{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "NEW"}\n'
    conf.write_text(theirs)  # another tool writes the .conf again while it is a conflist
    done = zds_cni("uninstall", *flags)
    assert done.returncode == 0 and "not restored" in done.stdout, done.stdout
    assert conf.read_text() == theirs
    assert "zds-cni" not in (conf_dir / "10-bridge.conflist").read_text()

    real = tmp_path / "real"
    real.mkdir()
    (real / "mesh.conflist").write_text(PODMAN_CONFLIST)
    for name in os.listdir(conf_dir):
        os.unlink(conf_dir / name)
    (conf_dir / "87-mesh.conflist").symlink_to(real / "mesh.conflist")
    assert zds_cni("install", *flags).returncode == 0
    assert (conf_dir / "87-mesh.conflist").is_symlink() and "zds-cni" in (real / "mesh.conflist").read_text()
    assert zds_cni("uninstall", *flags).returncode == 0
    assert (conf_dir / "87-mesh.conflist").is_symlink()
    assert json.loads((real / "mesh.conflist").read_text()) == json.loads(PODMAN_CONFLIST)


def test_configs_that_cannot_be_read_are_skipped_and_named_as_istio_skips_them(
    tmp_path: pathlib.Path,
) -> None:
    """A file that is not UTF-8 (it was a traceback), a dangling symlink, a directory named as
    a config: Istio's install-cni (getConfigFilenames) and libcni skip what they cannot load;
    zds stopped install and uninstall there. Now each is skipped and named on a line."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    (conf_dir / "05-x.conflist").write_bytes(b"\xff{")
    (conf_dir / "06-gone.conflist").symlink_to(tmp_path / "nowhere")
    (conf_dir / "07-dir.conf").mkdir()
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    skipped = [
        f"skipped {conf_dir / '05-x.conflist'}, which cannot be read: not UTF-8 text (invalid start byte at byte 0)",
        f"skipped {conf_dir / '06-gone.conflist'}, which cannot be read: No such file or directory",
        f"skipped {conf_dir / '07-dir.conf'}, which cannot be read: Is a directory",
    ]
    done = zds_cni("install", *flags)  # the first valid one: 87-mesh
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == skipped
    assert done.stdout.splitlines()[-1] == f"chained zds-cni into {conf_dir / '87-mesh.conflist'}"
    done = zds_cni("uninstall", *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == skipped
    assert (conf_dir / "87-mesh.conflist").read_text() == PODMAN_CONFLIST and os.listdir(bin_dir) == []
    done = zds_cni("install", *flags, "--network", "other")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"zds cni install: no network named 'other' in {conf_dir} (podman network ls lists Podman's; "
        f'the name is the config\'s "name"); ' + "; ".join(skipped)
    ]


def test_an_install_that_cannot_write_the_conf_dir_leaves_nothing_of_its_own(tmp_path: pathlib.Path) -> None:
    """The conf dir immutable: it exited with a raw "[Errno 1]" and left its launcher; a .conf
    it could not move aside left both it and the .conflist made from it (two configs of one
    network; the next install refused). One line now, and nothing of the install stays."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    conf = conf_dir / "10-x.conf"
    conf.write_text('{"cniVersion": "0.4.0", "name": "x", "type": "bridge", "bridge": "x0"}\n')
    subprocess.run(["chattr", "+i", str(conf_dir)], check=True)
    try:
        done = zds_cni("install", *flags, "--network", "x")
    finally:
        subprocess.run(["chattr", "-i", str(conf_dir)], check=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"zds cni install: cannot chain zds-cni into {conf}: Operation not permitted; nothing was chained"
    ]
    assert os.listdir(bin_dir) == [] and sorted(os.listdir(conf_dir)) == ["10-x.conf"]
    assert zds_cni("install", *flags, "--network", "x").returncode == 0  # writable again: it goes in


def test_an_uninstall_that_cannot_remove_a_conflist_leaves_it_all_as_it_was(tmp_path: pathlib.Path) -> None:
    """The conflist made from a .conf immutable: uninstall restored the .conf, failed to
    remove the conflist (a raw error), and left both (two configs of one network). Now
    neither moves, in one line, and the launcher stays while zds-cni is chained."""
    bin_dir, conf_dir, flags = dirs(tmp_path)
    (conf_dir / "10-x.conf").write_text('{"cniVersion": "0.4.0", "name": "x", "type": "bridge"}\n')
    assert zds_cni("install", *flags, "--network", "x").returncode == 0
    before = sorted(os.listdir(conf_dir))
    assert before == ["10-x.conf.zds-cni-orig", "10-x.conflist"]
    conflist = conf_dir / "10-x.conflist"
    subprocess.run(["chattr", "+i", str(conflist)], check=True)
    try:
        done = zds_cni("uninstall", *flags)
    finally:
        subprocess.run(["chattr", "-i", str(conflist)], check=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"zds cni uninstall: cannot take zds-cni out of {conflist}: Operation not permitted; "
        "that file is left as it was"
    ]
    assert sorted(os.listdir(conf_dir)) == before and os.listdir(bin_dir) == ["zds-cni"]
    assert zds_cni("uninstall", *flags).returncode == 0  # writable again: it comes out
    assert sorted(os.listdir(conf_dir)) == ["10-x.conf"] and os.listdir(bin_dir) == []


def test_uninstall_of_one_network_keeps_the_others_and_the_launcher_they_run(tmp_path: pathlib.Path) -> None:
    bin_dir, conf_dir, flags = dirs(tmp_path)
    mesh = conf_dir / "87-mesh.conflist"
    mesh.write_text(PODMAN_CONFLIST)
    other = conf_dir / "10-other.conflist"
    other.write_text(OTHER)
    for network in ("mesh", "other"):
        assert zds_cni("install", *flags, "--network", network).returncode == 0
    launcher = bin_dir / "zds-cni"

    done = zds_cni("uninstall", *flags, "--network", "mesh")
    assert done.returncode == 0, done.stderr
    assert mesh.read_text() == PODMAN_CONFLIST
    assert [p["type"] for p in json.loads(other.read_text())["plugins"]] == ["bridge", "zds-cni"]
    assert launcher.exists()
    assert f"kept {launcher}: zds-cni is still chained into 'other' ({other})" in done.stdout

    again = zds_cni("uninstall", *flags, "--network", "mesh")
    assert again.returncode == 0, again.stderr
    assert f"zds-cni is not chained into a network named 'mesh' in {conf_dir}" in again.stdout
    assert launcher.exists()

    last = zds_cni("uninstall", *flags, "--network", "other")
    assert last.returncode == 0, last.stderr
    assert other.read_text() == OTHER
    assert not launcher.exists()
    assert f"removed {launcher}" in last.stdout


@pytest.mark.parametrize("flag", ["--bin-dir", "--conf-dir"])
def test_an_empty_directory_flag_is_refused_not_taken_for_the_working_directory(
    flag: str, tmp_path: pathlib.Path
) -> None:
    """``--bin-dir ""`` installed zds-cni into the directory the command ran in."""
    bin_dir, conf_dir, _ = dirs(tmp_path)
    (conf_dir / "87-mesh.conflist").write_text(PODMAN_CONFLIST)
    work = tmp_path / "work"
    work.mkdir()
    given = ["--conf-dir", str(conf_dir)] if flag == "--bin-dir" else ["--bin-dir", str(bin_dir)]
    for command in ("install", "uninstall"):
        done = subprocess.run(
            [*ZDS, "cni", command, *given, flag, ""], capture_output=True, text=True, timeout=60, cwd=work
        )
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr.splitlines()[-1] == (
            f"zds cni {command}: error: argument {flag}: give a directory (an empty path names none)"
        )
    assert os.listdir(work) == [] and os.listdir(bin_dir) == []
    assert (conf_dir / "87-mesh.conflist").read_text() == PODMAN_CONFLIST
