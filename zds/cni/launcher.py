"""The executable ``zds cni install`` puts into the bin dir: a launcher, a Python script whose
first line is the interpreter zds is installed with (``#!PYTHON -I``, as a runtime runs it:
no PYTHONPATH, no user site), which runs ``zds.cni.plugin``; and the checks that it will run
before and after it is written (an install that said done while every ADD and DEL of the
network failed was worse than one refused)."""

from __future__ import annotations

import json

from zds import __version__
from zds.errors import ZdsError, as_bytes_read

#: The launcher's second line: how uninstall knows the executable is zds's.
LAUNCHER_MARK = "# zds-cni: zds's CNI plugin, written by `zds cni install`"


class InstallError(ZdsError):
    """What ``zds cni install|uninstall`` cannot do; the message says what to do."""


def launcher(python: str) -> str:
    # (-I, as a runtime runs it anyway: no PYTHONPATH, no user site, not its directory. zds not
    # importable there is the spec's error on stdout, and a DEL that succeeds, not a traceback.)
    return (
        f"#!{python} -I\n"
        f"{LAUNCHER_MARK} (zds {__version__}).\n"
        "# It runs zds.cni.plugin from the Python environment zds is installed in.\n"
        "import sys\n\n"
        "try:\n"
        "    from zds.cni.plugin import main\n"
        "except Exception as exc:\n"
        "    import json, os\n\n"
        '    if os.environ.get("CNI_COMMAND") == "DEL":\n'
        "        sys.exit(0)\n"
        "    try:\n"
        '        version = str(json.loads(sys.stdin.read()).get("cniVersion") or "1.0.0")\n'
        "    except Exception:\n"
        '        version = "1.0.0"\n'
        '    said = {"cniVersion": version, "code": 999, "msg": f"zds-cni: cannot load zds: {exc}",\n'
        '            "details": f"{sys.executable} -I cannot import zds.cni.plugin; run zds cni install again"}\n'
        "    print(json.dumps(said))\n"
        "    sys.exit(1)\n\n"
        "sys.exit(main())\n"
    )


#: The longest #! line Linux runs (BINPRM_BUF_SIZE less the "#!" and the line's end, 5.1+).
SHEBANG_MAX = 255


def check_launcher(path: str) -> None:
    """InstallError unless the launcher at ``path`` answers VERSION as a runtime runs it (a
    bin dir mounted noexec, say, would fail every ADD and DEL)."""
    import subprocess

    try:
        done = subprocess.run(
            [path],
            input=b"{}",
            env={"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            cwd="/",
            capture_output=True,
            timeout=60,
        )
        ok = done.returncode == 0 and "supportedVersions" in json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError, TypeError) as exc:
        raise InstallError(f"the launcher {path} does not run: {exc}") from exc
    if not ok:
        raise InstallError(f"the launcher {path} does not answer VERSION (exit code {done.returncode})")


def check_python(python: str) -> None:
    """InstallError unless ``python`` imports zds's plugin as a runtime will run the launcher:
    isolated (-I), from another directory, with a bare environment."""
    import subprocess

    try:
        shebang = f"#!{python} -I".encode()
    except UnicodeEncodeError:  # (a traceback: the launcher is text, its #! line too)
        raise InstallError(
            f"{as_bytes_read(python)}: the path of Python is not UTF-8 text, and the launcher's #! line must be; "
            "install zds under a UTF-8 path"
        ) from None
    if any(c.isspace() for c in python) or len(shebang) > SHEBANG_MAX:
        raise InstallError(
            f"{python!r} cannot be the launcher's #! line (a space in it, or over {SHEBANG_MAX} "
            "bytes): the kernel would not run it; install zds under a path without spaces"
        )
    try:
        done = subprocess.run(
            [python, "-I", "-c", "import zds.cni.plugin"],
            cwd="/",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"cannot run {python} to check it imports zds: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise InstallError(
            f"{python} -I cannot import zds ({said}), and a CNI runtime runs the plugin that way "
            "(no PYTHONPATH, no user site, not this directory): install zds into that Python's "
            "environment (./dev setup makes .venv) and run zds cni install from there"
        )


def is_ours(path: str) -> bool:
    try:
        with open(path) as f:
            return LAUNCHER_MARK in f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
