"""The command line reads alike everywhere: help on every flag and subcommand, one way
to show defaults, log flags after any subcommand, one error prefix, light start-up."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import grpc
import pytest

from tests.harness import ZDS, NodeAgentProc, ZtunnelProc, run_unique, signal_mask, taken_port, wait_until
from zds import cliflags, defaults, runtime
from zds.cli import PART_OF, build_parser, command_of

PARSER = build_parser()
LEAVES = {leaf.prog: leaf for leaf in cliflags.leaf_parsers(PARSER)}


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=env
    )
    return done.stdout


def test_every_command_is_a_leaf_we_know() -> None:
    assert set(LEAVES) == {
        "zds server",
        "zds pod add",
        "zds pod remove",
        "zds pod list",
        "zds connections",
        "zds watch",
        "zds ztunnel",
        "zds netns create",
        "zds netns delete",
        "zds netns list",
        "zds demo",
        "zds cni install",
        "zds cni uninstall",
        "zds check node-agent",
        "zds check ztunnel",
        "zds fault",
        "zds faults list",
        "zds faults clear",
    }


@pytest.mark.parametrize("prog", sorted(LEAVES))
def test_every_command_has_a_description_and_every_flag_a_help_text(prog: str) -> None:
    leaf = LEAVES[prog]
    assert leaf.description, f"{prog} has no description"
    for action in leaf._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{prog} {'/'.join(action.option_strings) or action.dest} has no help text"


@pytest.mark.parametrize("prog", sorted(LEAVES))
def test_defaults_are_shown_one_way(prog: str) -> None:
    for action in LEAVES[prog]._actions:
        text = action.help or ""
        if "%(default)s" in text:
            assert "(default: %(default)s" in text or "default: %(default)s)" in text, (prog, text)
        assert "(default " not in text, (prog, text)
    # And whatever the default, --help shows it as "(default: X)": never "; default: X" nor
    # "(repeatable; default: X)", in a flag's help (with or without %(default)s) or anywhere else.
    shown = " ".join(LEAVES[prog].format_help().split())
    stray = re.findall(r".{0,40}(?<!\()(?<!by )default:.{0,20}", shown, flags=re.IGNORECASE)
    assert not stray, (prog, stray)


@pytest.mark.parametrize("prog", sorted(LEAVES))
def test_log_flags_work_after_every_subcommand(prog: str) -> None:
    argv = prog.split()[1:]
    required = {
        "zds pod remove": ["--uid", "u"],
        "zds netns create": ["n"],
        "zds netns delete": ["n"],
        "zds fault": ["delay"],
    }.get(prog, [])
    args = PARSER.parse_args([*argv, *required, "--log-level", "debug", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("debug", "json")
    plain = PARSER.parse_args([*argv, *required])
    assert (plain.log_level, plain.log_format) == ("info", "text")


@pytest.mark.parametrize("prog", sorted(LEAVES))
def test_a_run_builds_only_its_commands_parsers_and_they_are_the_whole_parsers_own(prog: str) -> None:
    command = prog.split()[1]
    argv = [*prog.split()[1:], "--log-level", "debug"]
    for before in ([], ["--log-level", "warning"], ["--log-format=json"]):
        assert command_of([*before, *argv]) == command
    partial = build_parser(command)
    # Only the part that registers the command: its commands and no other.
    commands = {other for other, part in PART_OF.items() if part == PART_OF[command]}
    assert set(_commands(partial)) == commands
    leaves = {leaf.prog: leaf for leaf in cliflags.leaf_parsers(partial)}
    assert leaves[prog].format_help() == LEAVES[prog].format_help()
    assert partial.format_usage() == PARSER.format_usage()


def test_help_version_and_anything_unclear_get_the_whole_parser() -> None:
    for argv in (
        [],
        ["--help"],
        ["-h", "pod"],
        ["--version"],
        ["--log-l", "debug", "pod"],
        ["srever"],
        ["--x"],
    ):
        assert command_of(argv) is None, argv
    assert set(_commands(PARSER)) == set(PART_OF)
    done = subprocess.run([sys.executable, "-m", "zds", "srever"], capture_output=True, text=True, timeout=60)
    # Every command offered (how argparse quotes them has changed between Python versions).
    assert done.returncode == 2 and "invalid choice: 'srever' (choose from " in done.stderr
    offered = done.stderr.split("(choose from ", 1)[1]
    assert all(command in offered for command in PART_OF)
    with pytest.raises(ValueError, match="no zds command 'srever'"):
        build_parser("srever")


def test_a_run_imports_no_other_commands_modules() -> None:
    run = "from zds.cli import main; main(['pod', 'list', '--control-socket', '/nonexistent'])"
    code = f"{run}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(run_python(code).splitlines()[-1]))
    others = set(PART_OF.values()) - {PART_OF["pod"]}
    assert "zds.server.controlcli" in loaded and loaded & others == set()


def test_run_as_the_program_zds_collects_no_garbage_until_its_start_up_is_over() -> None:
    code = """
import gc, sys
import zds.cli as cli
during = []
real = cli.build_parser
def build(command):
    during.append(gc.isenabled())
    return real(command)
cli.build_parser = build
sys.argv = ["zds", "pod", "list", "--control-socket", "/nonexistent/control.sock"]
code = cli.main()
print(during, gc.isenabled(), gc.get_freeze_count() > 0, code)
"""
    # Held while the parser was built; resumed, with start-up's objects frozen, by the end.
    assert run_python(code).split() == ["[False]", "True", "True", "1"]


def test_a_call_from_python_leaves_the_garbage_collector_alone() -> None:
    code = """
import gc
from zds.cli import main
frozen = gc.get_freeze_count()
code = main(["pod", "list", "--control-socket", "/nonexistent/control.sock"])
print(gc.isenabled(), gc.get_freeze_count() == frozen, code)
"""
    # (In a process of its own: main() configures logging for the whole process.)
    assert run_python(code).split() == ["True", "True", "1"]


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.mark.root  # (it asks for a capability root has)
def test_the_capabilities_are_read_whatever_bytes_the_process_name_holds() -> None:
    """/proc/self/status starts with the process's name, any bytes: read as text, one that is
    not UTF-8 made every privilege check a traceback (zds run as a program so named)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/comm", "rb") as comm:
        name = comm.read().rstrip(b"\n")
    assert libc.prctl(15, b"zds-\xff", 0, 0, 0) == 0  # PR_SET_NAME
    try:
        with open("/proc/self/status", "rb") as status:
            assert status.readline() == b"Name:\tzds-\xff\n"
        assert runtime.missing_capabilities(("CAP_SYS_ADMIN",)) == []
    finally:
        libc.prctl(15, name, 0, 0, 0)


def test_the_nodes_resolvers_are_read_past_a_comment_in_another_encoding(tmp_path: pathlib.Path) -> None:
    """A Latin-1 comment in /etc/resolv.conf was a UnicodeDecodeError traceback at every start
    of ``zds ztunnel``."""
    from zds.client.inpod import node_resolvers

    conf = tmp_path / "resolv.conf"
    conf.write_bytes(
        b"# G\xe9n\xe9r\xe9 par NetworkManager\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
    )
    assert node_resolvers(str(conf)) == [("192.0.2.53", 53), ("fe80::1", 53)]


def test_the_ztunnel_help_and_config_name_the_dns_port() -> None:
    help_text = LEAVES["zds ztunnel"].format_help()
    assert "15053" in help_text and "--dns-port" in help_text


@pytest.mark.parametrize("command", ["server", "ztunnel"])
def test_busy_poll_takes_microseconds_and_refuses_anything_else_in_one_line(command: str) -> None:
    assert PARSER.parse_args([command]).busy_poll == defaults.BUSY_POLL
    assert PARSER.parse_args([command, "--busy-poll", "250"]).busy_poll == 0.00025
    assert PARSER.parse_args([command, "--busy-poll", "0"]).busy_poll == 0.0  # off
    for bad in ("-1", "1.5", "abc", "10001", "\u00b2"):
        err = io.StringIO()
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(err):
            PARSER.parse_args([command, "--busy-poll", bad])
        assert exit_.value.code == 2
        last = err.getvalue().strip().splitlines()[-1]
        assert last.endswith(
            f"argument --busy-poll: {bad!r} is not a number of microseconds from 0 (off) to 10000"
        ), last


def test_a_port_is_ascii_digits_from_1_to_65535() -> None:
    assert PARSER.parse_args(["ztunnel", "--dns-port", "5353"]).dns_port == 5353
    for bad in ("0", "65536", "\u00b2", "\u0663", "53a"):
        err = io.StringIO()
        with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
            PARSER.parse_args(["ztunnel", "--dns-port", bad])
        assert err.getvalue().strip().endswith(f"argument --dns-port: {bad!r} is not a TCP port (1-65535)")


@pytest.mark.parametrize("parent", ["\u00b2", "\u0661\u0662", "3000000000", "9" * 20, "0"])
def test_a_parent_pid_that_is_no_pid_is_not_followed(parent: str) -> None:
    """ZDS_PARENT_PID (set by ``zds demo`` for its children) of a digit int() cannot read
    ("²") or past the largest pid (os.kill overflowed) was a traceback from every command;
    one it reads as another number ("١٢": 12) was followed; 0 is no process's."""
    done = subprocess.run(
        [*ZDS, "netns", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ZDS_PARENT_PID": parent},
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_parent_pid_of_a_parent_gone_ends_the_command_saying_so() -> None:
    """A stale ZDS_PARENT_PID in a shell's environment ended every command: "Terminated", 143."""
    done = subprocess.run(
        [*ZDS, "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "ZDS_PARENT_PID": str(runtime.PID_MAX_LIMIT - 1),
        },  # (no process: pid_max is lower)
    )
    assert done.returncode == -signal.SIGTERM and done.stdout == ""
    assert (
        done.stderr
        == f"zds: ZDS_PARENT_PID={runtime.PID_MAX_LIMIT - 1}: the parent it names is gone; ending\n"
    )


@pytest.mark.parametrize("command", [["pod", "add", "--netns", "x"], ["pod", "remove"]])
def test_an_empty_uid_is_called_empty_not_missing_and_is_a_usage_error(command: list[str]) -> None:
    """It was exit 1 (``zds pod add``; ``zds pod remove`` asked the node agent for pod ""),
    where every other flag argparse refuses is exit 2."""
    for uid in ("", " "):
        done = subprocess.run(
            [sys.executable, "-m", "zds", *command, "--uid", uid], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines()[-1] == (
            f"zds {' '.join(command[:2])}: error: argument --uid: give the pod's uid (an empty one names no pod)"
        )


def test_errors_start_with_zds_and_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zds", "pod", "list", "--control-socket", "/nonexistent/control.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("zds pod list: cannot reach the node agent: /nonexistent/control.sock")
    assert len(done.stderr.strip().splitlines()) == 1


def _run_into_a_closed_pipe(argv: list[str], unbuffered: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with its stdout a pipe whose reader is gone (``... | true``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["server", "--help"], ["netns", "list"], ["check", "ztunnel", "--list"]],
)
def test_output_into_a_pipe_nobody_reads_is_no_error_and_no_traceback(
    argv: list[str], unbuffered: bool
) -> None:
    done = _run_into_a_closed_pipe([sys.executable, "-m", "zds", *argv], unbuffered)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["server", "--help"], ["check", "ztunnel", "--list"]]
)
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(argv: list[str], unbuffered: bool) -> None:
    """``> /dev/full`` (ENOSPC; EIO alike): a traceback from wherever the write was."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "zds", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=env,
        )
    assert (done.returncode, done.stderr) == (1, "zds: cannot write the output: No space left on device\n")


def test_a_broken_pipe_that_is_not_stdout_is_not_taken_for_a_reader_gone() -> None:
    code = (
        "import sys\nfrom zds.output import stdout_reader_gone\nsys.stderr.write(str(stdout_reader_gone()))"
    )
    live = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert live.stderr == "False"
    assert _run_into_a_closed_pipe([sys.executable, "-c", code]).stderr == "True"


HEAVY = (
    "pyroute2",
    "opentelemetry",
    "aiohttp",
    "yaml",
    "zds.demo.story",
    "zds.netns.podnet",
    "zds.server.agent",
)


def _heavy_loaded(after: str) -> list[str]:
    code = (
        "import json, sys\n"
        f"{after}\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m for m in sys.modules for h in heavy if m == h or m.startswith(h + '.')})))"
    )
    loaded: list[str] = json.loads(run_python(code).splitlines()[-1])
    return loaded


def test_building_the_parser_loads_nothing_heavy() -> None:
    assert _heavy_loaded("from zds.cli import build_parser; build_parser()") == []
    assert _heavy_loaded("from zds.cli import build_parser; build_parser()\nimport zds.netns") == []


def test_parsing_a_command_line_never_asks_the_terminal_its_size() -> None:
    """argparse sizes a formatter to the terminal (importing shutil for it) for every flag it
    adds; zds's parsers do it only to format help or an error (cliflags.HelpFormatter)."""
    code = (
        "import sys\nfrom zds.cli import PART_OF, build_parser\n"
        "for command in sorted(PART_OF):\n    build_parser(command)\n"
        "build_parser().parse_args(['pod', 'list'])\nprint('shutil' in sys.modules)"
    )
    assert run_python(code).split() == ["False"]


@pytest.mark.parametrize("argv", [["pod", "add", "--help"], ["fault", "--help"], ["ztunnel", "--help"]])
def test_help_and_usage_are_still_sized_to_the_terminal(argv: list[str]) -> None:
    shown = {}
    for columns in (50, 200):
        done = subprocess.run(
            [sys.executable, "-m", "zds", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": str(columns)},
        )
        shown[columns] = (done.stdout + done.stderr).splitlines()
        assert shown[columns][0].startswith("usage: zds ")
    assert len(shown[50]) > len(shown[200])  # wrapped to 50 columns, not to 200
    assert max(len(line) for line in shown[200]) > 80


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["ztunnel", "--nope"], "zds ztunnel: error: unrecognized arguments: --nope"),
        (["pod", "list", "--nope", "x"], "zds pod list: error: unrecognized arguments: --nope x"),
        (["--log-level", "debug", "server", "extra"], "zds server: error: unrecognized arguments: extra"),
        (
            ["pod", "add", "--uid", "u", "--ip", "1.2.3"],
            "zds pod add: error: argument --ip: '1.2.3' is not an IPv4 or IPv6 address",
        ),
        (  # (a zone: any text, any size, taken by Python's ipaddress; Go's net.ParseIP takes none)
            ["pod", "add", "--uid", "u", "--ip", "fe80::1%eth0"],
            "zds pod add: error: argument --ip: 'fe80::1%eth0' is not an IPv4 or IPv6 address",
        ),
        (
            ["server", "--ack-timeout", "0"],
            "zds server: error: argument --ack-timeout: 0 is not a positive number of seconds",
        ),
        (  # (exit 1, as the node agent's refusals: a usage error is argparse's 2)
            ["pod", "add", "--uid", "u", "--netns", "pid:0"],
            'zds pod add: error: argument --netns: bad netns reference "pid:0": expected "pid:N" with N '
            "a process id (at most 2147483647), or a path",
        ),
        (
            ["pod", "add", "--uid", "u", "--netns", " "],
            'zds pod add: error: argument --netns: empty netns reference: expected "pid:N" or a path',
        ),
    ],
)
def test_a_flag_argparse_refuses_is_one_line_and_exit_2(argv: list[str], line: str) -> None:
    """README: every command's errors are one line; argparse printed the whole usage first."""
    done = subprocess.run([sys.executable, "-m", "zds", *argv], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", line + "\n")


def test_the_client_commands_load_nothing_heavy() -> None:
    run = "from zds.cli import main; main(['pod', 'list', '--control-socket', '/nonexistent'])"
    assert _heavy_loaded(run) == []
    run = "from zds.cli import main; main(['connections', '--control-socket', '/nonexistent'])"
    assert _heavy_loaded(run) == []


def test_zds_pod_add_reads_a_pods_file_without_loading_namespace_or_wire_code(tmp_path: pathlib.Path) -> None:
    # It names netns (NetnsRef) and never opens, enters or encodes one: ~6 ms of its start-up;
    # nor does it make a dataclass (``dataclasses`` imports ``inspect``: ~5 ms).
    pods = tmp_path / "pods.jsonl"
    pods.write_text('{"uid": "u1", "netns": "/var/run/netns/pod-a"}\n')
    run = f"from zds.cli import main; main(['pod', 'add', '--from-file', {str(pods)!r}, '--control-socket', '/nonexistent'])"
    code = f"{run}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(run_python(code).splitlines()[-1]))
    assert {"zds.server.podsfile", "zds.netns.ref"} <= loaded
    assert (
        loaded
        & {"ctypes", "zds.netns.kernel", "zds.netns.handle", "zds.netns.enter", "zds.protocol.messages"}
        == set()
    )
    assert loaded & {"dataclasses", "inspect"} == set()


def test_zds_ztunnel_makes_no_dataclass() -> None:
    # A frozen dataclass is ~0.4 ms a class at import, a NamedTuple ~0.06: ~12 ms of the
    # ztunnel side's start before its hello (zds.values). Its modules, the DNS forwarder's too.
    code = (
        "import json, sys\n"
        "import zds.client.app, zds.client.cli, zds.client.dns, zds.server.faultkinds\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('zds.'))), 'dataclasses' in sys.modules)"
    )
    names, dataclasses_loaded = run_python(code).rsplit(" ", 1)
    assert {"zds.client.app", "zds.protocol.messages", "zds.protocol.ztunnel", "zds.netns.kernel"} <= set(
        json.loads(names)
    )
    assert dataclasses_loaded.strip() == "False"


def test_logging_left_for_later_is_configured_as_asked_once_something_needs_it() -> None:
    code = """
import json, logging, sys
from zds import runtime
from zds.logs import BatchingStreamHandler, JsonFormatter
def zds_handlers():
    return [h for h in logging.getLogger().handlers if isinstance(h, BatchingStreamHandler)]
runtime.logs_needed()  # nothing was left for later: nothing to do
runtime.configure_logs("debug", "text", later=True)  # an earlier command's, never needed...
runtime.configure_logs("warning", "json", later=True)  # ...replaced by the next command's
steps = [len(zds_handlers())]
runtime.logs_needed()
(handler,) = zds_handlers()
runtime.logs_needed()  # configured once only
steps += [len(zds_handlers()), isinstance(handler.formatter, JsonFormatter),
          logging.getLevelName(logging.getLogger().level), zds_handlers() == [handler]]
runtime.configure_logs("debug", "text", later=True)
runtime.configure_logs("error", "text")  # now: what was left for later is gone with it
runtime.logs_needed()
steps.append(logging.getLevelName(logging.getLogger().level))
print(json.dumps(steps))
"""
    assert json.loads(run_python(code).splitlines()[-1]) == [0, 1, True, "WARNING", True, "ERROR"]


def test_pod_add_over_grpc_configures_logging_as_asked_before_grpc_loads() -> None:
    # A TCP address: the gRPC path, whose library logs.
    code = """
import json, logging, sys
import zds.logs
real, grpc_loaded = zds.logs.configure, []
def configure(level, fmt):
    grpc_loaded.append("grpc" in sys.modules)
    real(level, fmt)
zds.logs.configure = configure
from zds.cli import main
main(["pod", "add", "--uid", "u", "--netns", "/var/run/netns/x", "--grpc-address", "127.0.0.1:1",
      "--grpc-insecure", "--timeout", "0.1", "--log-format", "json"])
handlers = [[type(h).__name__, type(h.formatter).__name__] for h in logging.getLogger().handlers]
print(json.dumps([grpc_loaded, "grpc" in sys.modules, handlers]))
"""
    assert json.loads(run_python(code).splitlines()[-1]) == [
        [False],
        True,
        [["BatchingStreamHandler", "JsonFormatter"]],
    ]


def test_the_ztunnel_side_loads_no_node_agent_and_no_fixtures() -> None:
    loaded = _heavy_loaded("import zds.client.app")
    assert not [m for m in loaded if m.startswith(("pyroute2", "zds.demo", "zds.netns.podnet", "zds.server"))]


def test_a_node_agent_without_rules_never_loads_the_netlink_code_and_one_with_rules_at_start() -> None:
    # pyroute2 is ~5 MB of the node agent's memory: only the policy routing of the rules needs it.
    node_agent = "import zds.server.main, zds.server.agent, zds.server.enrollment, zds.server.podrules"
    assert not [m for m in _heavy_loaded(node_agent) if m.startswith("pyroute2")]
    with_rules = f"{node_agent}\nfrom zds.server.redirect import redirector\nredirector('iptables')"
    assert "pyroute2" in _heavy_loaded(with_rules)


@pytest.mark.root
def test_debug_logs_are_zds_s_not_every_netlink_message_of_pyroute2() -> None:
    from zds.netns.fixtures import delete_netns

    name = run_unique("zds-clidebug-")
    try:
        done = subprocess.run(
            [*ZDS, "--log-level", "debug", "netns", "create", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        delete_netns(name, missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert " debug zds.netns" in done.stderr  # zds's own debug lines are there
    assert "pyroute2" not in done.stderr  # made through pyroute2, whose lines are not


@pytest.mark.root
def test_netns_delete_refuses_the_netns_of_an_enrolled_pod(tmp_path: pathlib.Path) -> None:
    from zds.netns.fixtures import create_netns, delete_netns

    name = run_unique("zds-clitest-")
    path = create_netns(name)
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    try:
        with pytest.raises(grpc.RpcError) as caught:  # cached all the same: no ztunnel is connected
            server.add_pod("cli-u1", path, namespace="shop")
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        refused = subprocess.run(
            [*ZDS, "netns", "delete", name, "--control-socket", server.control_socket],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"zds netns delete: netns {name} is the netns of enrolled pod cli-u1 (shop/cli-u1); "
            "remove the pod first (zds pod remove --uid cli-u1), or pass --force"
        )
        assert os.path.exists(path)
        server.remove_pod("cli-u1")
        done = subprocess.run(
            [*ZDS, "netns", "delete", name, "--control-socket", server.control_socket],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert not os.path.exists(path)
    finally:
        server.stop()
        delete_netns(name, missing_ok=True)


def test_run_as_the_program_zds_never_runs_protobufs_pure_python_message_code() -> None:
    # Imported by protobuf whatever its implementation, used only by the pure-Python one.
    code = """
import sys
import zds.cli as cli
sys.argv = ["zds", "pod", "list", "--control-socket", "/nonexistent/control.sock"]
code = cli.main()
from zds.gen import nodeagent_pb2
from zds.protocol.messages import Ack, AddWorkload, WorkloadInfo, decode_ack, decode_request, encode_ack, encode_request
add = AddWorkload(uid="u1", info=WorkloadInfo(name="p", namespace="n", service_account="sa"))
assert decode_request(encode_request(add)) == add
assert decode_ack(encode_ack(Ack(error="no"))) == Ack(error="no")
assert nodeagent_pb2.AddPodsRequest.FromString(b"").pods == []
print(type(sys.modules["google.protobuf.internal.python_message"]).__name__, "google.protobuf.text_format" in sys.modules, code)
"""
    assert run_python(code).split() == ["_LazyModule", "False", "1"]


def test_with_protobufs_pure_python_implementation_its_message_code_runs_when_used() -> None:
    code = """
import sys
from zds import runtime
runtime.starting()
from google.protobuf.internal import api_implementation
from zds.gen import zds_pb2
add = zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid="u1"))
assert zds_pb2.WorkloadRequest.FromString(add.SerializeToString()).add.uid == "u1"
print(api_implementation.Type(), type(sys.modules["google.protobuf.internal.python_message"]).__name__)
"""
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    assert run_python(code, env).split() == ["python", "module"]


def test_defer_import_runs_a_module_at_its_first_use_only(tmp_path: pathlib.Path) -> None:
    package = tmp_path / "deferpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "heavy.py").write_text("import builtins\nbuiltins.heavy_ran = True\nVALUE = 42\n")
    code = f"""
import builtins, sys
sys.path.insert(0, {str(tmp_path)!r})
from zds import runtime
runtime.defer_import("deferpkg.heavy")
runtime.defer_import("deferpkg.missing")  # nothing to defer: nothing happens
from deferpkg import heavy
ran_at_import = getattr(builtins, "heavy_ran", False)
print(ran_at_import, heavy.VALUE, builtins.heavy_ran, "deferpkg.missing" in sys.modules)
"""
    assert run_python(code).split() == ["False", "42", "True", "False"]


@pytest.mark.parametrize("digits", ["\u00b2", "1\u00b2", "\u0661"])
def test_numbers_are_ascii_digits_other_digits_are_refused_in_one_line(digits: str) -> None:
    """str.isdigit() also takes superscripts and other scripts' digits, which int() refuses
    (or reads): each number a flag or a pods file gives is 0-9 only, refused in one line."""
    from zds.client.admin import ListenAddressError, parse_listen
    from zds.netns import NetnsRef, NetnsRefError
    from zds.server.cli import _id
    from zds.server.options import StartupError, split_host_port

    with pytest.raises(ListenAddressError, match="bad port"):
        parse_listen(f"127.0.0.1:{digits}")
    with pytest.raises(StartupError, match="expected HOST:PORT"):
        split_host_port(f"127.0.0.1:{digits}", "--http-listen")
    with pytest.raises(argparse.ArgumentTypeError, match="not a numeric id"):
        _id(digits)
    with pytest.raises(NetnsRefError, match="bad netns reference"):
        NetnsRef.parse(f"pid:{digits}")


_ENGINE_KEY = (
    ": the container engines' events use the key '{}' for their own attribute; label the containers with "
    "another key"
)


@pytest.mark.parametrize(
    ("label", "says"),
    [
        # It matched no container, silently: the node agent enrolled nothing from the engine.
        *((label, "is not KEY or KEY=VALUE with a label key") for label in ("", "=ambient", " app")),
        # Podman's and Docker's events carry the container's name, image, ... under these keys,
        # over a label of the same name: a container labelled name=web was never taken for this
        # node agent's when it was created (zds-cni's ADD said "not selected"), only after a restart.
        *((label, _ENGINE_KEY.format(label.partition("=")[0])) for label in ("name=web", "image")),
    ],
)
def test_a_container_label_that_cannot_select_is_refused_in_one_line(label: str, says: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "zds",
            "server",
            "--container-label",
            label,
            "--container-engine",
            "/nonexistent",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"zds server: error: argument --container-label: {label!r}{'' if says.startswith(':') else ' '}{says}"
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["fault", "delay", "--delay", "nan"],
            "argument --delay: nan is not a number of seconds from 0 to 3600",
        ),
        (
            ["fault", "delay", "--delay", "inf"],
            "argument --delay: inf is not a number of seconds from 0 to 3600",
        ),
        (
            ["fault", "delay", "--delay", "1e300"],
            "argument --delay: 1e300 is not a number of seconds from 0 to 3600",
        ),
        (
            ["fault", "delay", "--skip-connections", "-1"],
            "argument --skip-connections: -1 is not a whole number",
        ),
        (
            ["fault", "delay", "--count", "99999999999"],
            "argument --count: 99999999999 is not a positive integer",
        ),
        (["pod", "list", "--timeout", "nan"], "argument --timeout: nan is not a positive number of seconds"),
        (
            ["pod", "add", "--from-file", "x", "--timeout", "1e308"],
            "argument --timeout: 1e308 seconds is over a day",
        ),
        (["pod", "list", "--timeout", "1e10"], "argument --timeout: 1e10 seconds is over a day (86400)"),
        (
            ["server", "--ack-timeout", "nan"],
            "argument --ack-timeout: nan is not a positive number of seconds",
        ),
        # (flags that take 0 say so)
        (
            ["server", "--netns-sweep", "-1"],
            "argument --netns-sweep: -1 is neither 0 (never) nor a positive number of seconds",
        ),
        (
            ["check", "node-agent", "--settle", "nan"],
            "argument --settle: nan is neither 0 (none) nor a positive number of seconds",
        ),
    ],
)
def test_numbers_a_flag_cannot_take_are_refused_in_one_line(
    argv: list[str], says: str, tmp_path: pathlib.Path
) -> None:
    """NaN and infinity were a ValueError or OverflowError traceback, a timeout of 0, or (the
    node agent's --ack-timeout) "no ack within nans"; a count past the control API's 32 bits a
    protobuf traceback."""
    # Every path a scratch one: were the flag taken, nothing of this machine's is touched.
    paths = ["--control-socket", str(tmp_path / "control.sock")]
    if argv[0] == "server":
        paths += ["--zds-socket", str(tmp_path / "zds.sock"), "--state-dir", str(tmp_path / "state")]
        paths += ["--cni-socket", "off", "--http-listen", "off"]
    done = subprocess.run(
        [sys.executable, "-m", "zds", *argv, *paths], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"zds {argv[0]}") and says in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--grpc-insecure"], "--grpc-insecure only applies with --grpc-listen"),
        (["--container-label", "a=b"], "--container-label only applies with --container-engine"),
        (["--netns-root", "pods/netns"], "--netns-root pods/netns: give an absolute path"),
        # (retried for good: the Docker client library's "Missing protocol scheme")
        (
            ["--container-engine", "ftp://x"],
            "--container-engine ftp://x: give the API socket's path, or a unix://, tcp://, http:// or "
            "https:// URL (ssh:// with asyncssh installed)",
        ),
        # (each retried for good, in a line that did not say: "[Invalid argument]", "is down: http://[::1/_ping")
        (["--container-engine", "unix://"], "--container-engine unix://: no socket path after unix://"),
        (
            ["--container-engine", "http://[::1"],
            "--container-engine http://[::1: not a URL with a host (and port)",
        ),
        (
            ["--container-engine", "tcp://:2375"],
            "--container-engine tcp://:2375: not a URL with a host (and port)",
        ),
    ],
)
def test_a_server_flag_that_would_be_ignored_is_refused_before_anything_is_made(
    flags: list[str], says: str, tmp_path: pathlib.Path
) -> None:
    """Each was taken and did nothing (``--tls-*`` without ``--grpc-listen`` was refused)."""
    paths = ["--control-socket", str(tmp_path / "control.sock"), "--zds-socket", str(tmp_path / "zds.sock")]
    paths += ["--state-dir", str(tmp_path / "state"), "--cni-socket", "off", "--http-listen", "off"]
    done = subprocess.run([*ZDS, "server", *flags, *paths], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.splitlines()[-1].endswith(f"error zds.server: {says}")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("mark", ["-1", "4294967296", "0x539"])
def test_a_ztunnel_mark_that_is_no_socket_mark_is_refused(mark: str) -> None:
    """``--mark -1`` was taken (and logged as "mark -1"); SO_MARK is 32 bits."""
    done = subprocess.run([*ZDS, "ztunnel", f"--mark={mark}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"zds ztunnel: error: argument --mark: {mark!r} is not a socket mark (0-4294967295)"
    )


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("", "give a path (an empty one names no socket)"),
        ("/run/" + "z" * 110, f"'/run/{'z' * 110}': 115 bytes, longer than a unix socket path may be (107)"),
    ],
)
def test_a_ztunnel_zds_socket_that_cannot_be_one_is_refused(path: str, says: str) -> None:
    """Either was taken, and the connection retried for good ("Invalid argument", "AF_UNIX path
    too long")."""
    done = subprocess.run([*ZDS, "ztunnel", "--zds-socket", path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"zds ztunnel: error: argument --zds-socket: {says}"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--tls-ca", "ca.pem"],
            "--tls-ca only applies with --grpc-address (the control socket takes no TLS)",
        ),
        (["--tls-cert", "c.pem", "--tls-key", "c.key"], "--tls-cert only applies with --grpc-address"),
        (
            ["--grpc-address", "127.0.0.1:1", "--grpc-insecure", "--tls-key", "c.key"],
            "--tls-key and --grpc-insecure exclude each other (TLS, or plaintext)",
        ),
    ],
)
def test_a_client_tls_flag_that_would_be_ignored_is_refused(
    flags: list[str], says: str, tmp_path: pathlib.Path
) -> None:
    """Each was taken and did nothing: the request went over the control socket, or in plaintext."""
    for command in (["pod", "list"], ["connections"], ["faults", "list"], ["pod", "remove", "--uid", "u"]):
        done = subprocess.run(
            [*ZDS, *command, *flags, "--control-socket", str(tmp_path / "c.sock")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        prog = " ".join(command[:2]) if command[0] != "connections" else "connections"
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr.startswith(f"zds {prog}: {says}") and len(done.stderr.splitlines()) == 1


LONG_SOCKET = "/tmp/" + "s" * 5000
#: The commands that take a unix socket path, and its flag.
SOCKET_FLAGS = [
    (["pod", "list"], "--control-socket"),
    (["pod", "add", "--uid", "u", "--netns", "x"], "--control-socket"),
    (["pod", "remove", "--uid", "u"], "--control-socket"),
    (["connections"], "--control-socket"),
    (["watch"], "--control-socket"),
    (["fault", "delay"], "--control-socket"),
    (["faults", "list"], "--control-socket"),
    (["faults", "clear"], "--control-socket"),
    (["netns", "delete", "zds-none-such"], "--control-socket"),
    (["check", "node-agent"], "--control-socket"),
    (["check", "node-agent"], "--zds-socket"),
    (["check", "ztunnel"], "--zds-socket"),
]


@pytest.mark.parametrize(("command", "flag"), SOCKET_FLAGS)
@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("", "give a path (an empty one names no socket)"),
        (  # (past sun_path: gRPC's "target uri is not valid")
            "/tmp/" + "s" * 150,
            f"'/tmp/{'s' * 150}': 155 bytes, longer than a unix socket path may be (107)",
        ),
        (  # (past PATH_MAX: an OSError traceback, "File name too long"; shown cut, not 5 KB)
            LONG_SOCKET,
            f"'/tmp/{'s' * 59}'...: 5005 bytes, longer than a unix socket path may be (107)",
        ),
    ],
)
def test_a_socket_path_no_socket_can_have_is_a_usage_error(
    command: list[str], flag: str, path: str, says: str
) -> None:
    """An empty --control-socket was "  does not exist"; one over sun_path gRPC's "target uri is
    not valid"; one over PATH_MAX a traceback, and in ``zds netns delete`` no node agent to ask:
    the netns was deleted unchecked."""
    done = subprocess.run([*ZDS, *command, flag, path], capture_output=True, text=True, timeout=60)
    prog = " ".join(command[:2]) if command[0] in ("pod", "faults", "netns", "check") else command[0]
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines()[-1] == f"zds {prog}: error: argument {flag}: {says}"


@pytest.mark.root
def test_netns_delete_given_a_control_socket_it_cannot_ask_deletes_nothing() -> None:
    from zds.netns.fixtures import create_netns, delete_netns

    name = run_unique("zds-clitest-")
    path = create_netns(name)
    try:
        done = subprocess.run(
            [*ZDS, "netns", "delete", name, "--control-socket", LONG_SOCKET],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and len(done.stderr.splitlines()[-1]) < 200, done.stderr
        assert os.path.exists(path)  # (it was deleted, the enrolled pods never asked)
    finally:
        delete_netns(name, missing_ok=True)


def _at_most_2_gib() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("kind", ["/dev/zero", "a FIFO without a writer", "a directory"])
@pytest.mark.parametrize("flag", ["--tls-ca", "--tls-key"])
def test_a_client_tls_file_that_is_no_pem_file_is_refused_in_one_line(
    kind: str, flag: str, tmp_path: pathlib.Path
) -> None:
    """--tls-ca /dev/zero was read until memory ran out (here: a MemoryError traceback, the
    command held to 2 GiB); a FIFO with no writer waited past --timeout, for good."""
    path = {"/dev/zero": "/dev/zero", "a directory": str(tmp_path)}.get(kind, str(tmp_path / "fifo"))
    if kind == "a FIFO without a writer":
        os.mkfifo(path)
    tls = [flag, path] if flag == "--tls-ca" else ["--tls-cert", "/dev/null", "--tls-key", path]
    done = subprocess.run(
        [*ZDS, "pod", "list", "--grpc-address", "127.0.0.1:1", *tls, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_at_most_2_gib,
    )
    why = {
        "/dev/zero": "over 1024 KiB; a PEM file is a few KiB",
        "a directory": "cannot read it (Is a directory)",
    }.get(kind, "cannot read it (a FIFO that gave nothing (is its writer started?))")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"zds pod list: {flag} {path}: {why}\n")


@pytest.mark.root
@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--state-dir", "cannot use state directory: {} is not a directory"),
        (
            "--netns-root",
            "--netns-root {} is not a directory; give the directory that holds pods' named namespaces",
        ),
    ],
)
def test_a_server_directory_flag_given_a_file_is_refused_in_one_line(
    flag: str, says: str, tmp_path: pathlib.Path
) -> None:
    """--state-dir FILE said "File exists"; --netns-root FILE was taken (nothing under it could be a netns)."""
    afile = tmp_path / "file"
    afile.write_text("kept\n")
    paths = ["--control-socket", str(tmp_path / "control.sock"), "--zds-socket", str(tmp_path / "zds.sock")]
    paths += ["--cni-socket", "off", "--http-listen", "off", "--no-redirect"]
    state = [] if flag == "--state-dir" else ["--state-dir", str(tmp_path / "state")]
    done = subprocess.run(
        [*ZDS, "server", *paths, *state, flag, str(afile)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].endswith(f"error zds.server: {says.format(afile)}"), done.stderr
    assert os.listdir(tmp_path) == ["file"] and afile.read_text() == "kept\n"


def test_every_help_text_is_ascii() -> None:
    """A stdout that takes ASCII only (``PYTHONIOENCODING=ascii``) made ``zds check ztunnel
    --help`` a UnicodeEncodeError (its description's section sign)."""
    for leaf in [PARSER, *LEAVES.values()]:
        assert leaf.format_help().isascii(), leaf.prog


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_command_started_with_stdin_stdout_or_stderr_closed_runs_as_with_dev_null(closed: int) -> None:
    # The first file opened took the number: `zds netns list >&-` was a traceback.
    done = subprocess.run(
        [*ZDS, "netns", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(closed),  # (only os.close: safe after fork)
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def lonely_ztunnel(tmp_path: pathlib.Path, *wrapper: str) -> ZtunnelProc:
    """``zds ztunnel`` with no node agent to reach (it keeps trying), run by ``wrapper``; no
    HTTP endpoints (their sockets would take the lowest fds before its event loop's)."""
    off = ["--admin-listen", "off", "--readiness-listen", "off", "--metrics-listen", "off"]
    return ZtunnelProc(str(tmp_path / "nobody.sock"), str(tmp_path / "ztunnel.log"), *off, wrapper=wrapper)


def closing(fd: int) -> list[str]:
    """A wrapper that runs the command with ``fd`` closed."""
    redirect = "0<&-" if fd == 0 else f"{fd}>&-"
    return ["sh", "-c", f'exec "$@" {redirect}', "sh"]


def loop_made(pid: int) -> bool:
    """Process ``pid`` has made its event loop (uvloop's, or asyncio's: an epoll fd)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # (closed meanwhile)
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return "anon_inode:[eventpoll]" in links


@pytest.mark.root
@pytest.mark.parametrize("closed", [0, 1, 2])
def test_the_ztunnel_side_started_with_a_std_fd_closed_stops_cleanly(
    closed: int, tmp_path: pathlib.Path
) -> None:
    # uvloop's epoll fd took the number: log lines went into it, and at the stop libuv's
    # own check (fd > STDERR_FILENO) aborted the process (exit 134, a core dump).
    ztunnel = lonely_ztunnel(tmp_path, *closing(closed))
    try:
        if closed == 2:  # (its log goes to /dev/null: nothing to read)
            wait_until(lambda: loop_made(ztunnel.pid), "its event loop")
        else:
            ztunnel.wait_for_output("failed to connect to the node agent")
    finally:
        code = ztunnel.stop(signal.SIGTERM)
    assert code == 0, ztunnel.output()


@pytest.mark.root
def test_started_with_sighup_ignored_as_nohup_does_a_sighup_stops_nothing(tmp_path: pathlib.Path) -> None:
    sighup = 1 << (signal.SIGHUP - 1)
    ztunnel = lonely_ztunnel(tmp_path, "nohup")
    try:
        # (logged by its event loop, once the loop's stop signals are set)
        ztunnel.wait_for_output("failed to connect to the node agent")
        # Still ignored (not taken over as a stop signal): the kernel drops a SIGHUP, and it goes on.
        assert signal_mask(ztunnel.pid, "SigIgn") & sighup and not signal_mask(ztunnel.pid, "SigCgt") & sighup
        ztunnel.proc.send_signal(signal.SIGHUP)
        assert ztunnel.proc.poll() is None, ztunnel.output()
    finally:
        code = ztunnel.stop(signal.SIGTERM)
    assert code == 0, ztunnel.output()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            [b"pod", b"add", b"--uid", b"\xff", b"--netns", b"/x"],
            "zds pod add: error: argument \\xff is not UTF-8 text",
        ),
        ([b"watch", b"--uid", b"a\xfe"], "zds watch: error: argument a\\xfe is not UTF-8 text"),
        (
            [b"pod", b"list", b"--grpc-address", b"\xff:1", b"--grpc-insecure"],
            "argument \\xff:1 is not UTF-8",
        ),
    ],
)
def test_an_argument_that_is_not_utf8_is_refused_in_one_line(argv: list[bytes], said: str) -> None:
    """Protobuf fields and gRPC targets take UTF-8 only: UnicodeEncodeError tracebacks."""
    done = subprocess.run([*(a.encode() for a in ZDS), *argv], capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 2 and said in err and len(err.splitlines()) <= 3, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["server", "--http-listen", "a..b:8000"],
            "--http-listen 'a..b:8000': 'a..b' is no host name or address",
        ),
        (["ztunnel", "--admin-listen", "a..b:0"], "'a..b' is no host name or address"),
    ],
)
def test_a_host_no_resolver_can_be_asked_for_is_refused_in_one_line(
    argv: list[str], said: str, tmp_path: pathlib.Path
) -> None:
    """IDNA cannot encode ``a..b``: getaddrinfo raised UnicodeError, a traceback."""
    paths = {
        "server": [
            "--zds-socket",
            f"{tmp_path}/z.sock",
            "--control-socket",
            f"{tmp_path}/c.sock",
            "--cni-socket",
            f"{tmp_path}/cni.sock",
            "--state-dir",
            f"{tmp_path}/state",
        ],
        "ztunnel": ["--zds-socket", f"{tmp_path}/z.sock"],
    }[argv[0]]
    done = subprocess.run([*ZDS, *argv, *paths], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == [], "a refused start left something behind"


def test_ids_past_gid_t_are_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    """--socket-group 99999999999 was an OverflowError traceback at the chown (the ZDS socket
    bound by then); 4294967295 is chown's "no change": the sockets kept root's group."""
    paths = [
        "--zds-socket",
        f"{tmp_path}/z",
        "--control-socket",
        f"{tmp_path}/c",
        "--state-dir",
        f"{tmp_path}/s",
    ]
    for flags, said in (
        (["--socket-group", "99999999999"], "zds server: --socket-group: '99999999999' is not a gid"),
        (["--socket-group", "4294967295"], "is not a gid (0-4294967294)"),
        (["--allow-uid", "4294967295"], "argument --allow-uid: '4294967295' is not a numeric id"),
    ):
        done = subprocess.run([*ZDS, "server", *flags, *paths], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.root
@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "abc"}, "must be a non-negative integer but got abc"),
        ({"OTEL_METRICS_EXEMPLAR_FILTER": "bogus"}, "Unknown exemplar filter 'bogus'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, 'Invalid value "zstd"'),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SPAN_EVENT_COUNT_LIMIT": "x"}, "got x"),
    ],
)
def test_an_otel_setting_the_sdk_refuses_is_one_line_and_nothing_made(
    env: dict[str, str], said: str, tmp_path: pathlib.Path
) -> None:
    """Each was a traceback: read as the SDK is imported, or as a provider or exporter is made,
    outside what was caught."""
    paths = [
        "--zds-socket",
        f"{tmp_path}/z",
        "--control-socket",
        f"{tmp_path}/c",
        "--cni-socket",
        f"{tmp_path}/n",
    ]
    done = subprocess.run(
        [*ZDS, "server", *paths, "--state-dir", f"{tmp_path}/s", "--http-listen", "127.0.0.1:0"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        done.returncode == 1
        and "cannot set up OpenTelemetry: an OTEL_* setting the SDK refuses" in done.stderr
    )
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert os.listdir(tmp_path) == [], "a refused start left something behind"


@pytest.mark.root
def test_a_refused_start_removes_every_directory_level_it_made(tmp_path: pathlib.Path) -> None:
    """Only the last level of each path was removed: a/, c/, e/ and s1/ stayed."""
    with taken_port() as port:
        done = subprocess.run(
            [
                *ZDS,
                "server",
                *("--zds-socket", f"{tmp_path}/a/b/z.sock", "--control-socket", f"{tmp_path}/c/d/c.sock"),
                *("--cni-socket", f"{tmp_path}/e/f/cni.sock", "--state-dir", f"{tmp_path}/s1/s2"),
                *("--http-listen", f"127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and "Address already in use" in done.stderr, done.stderr
        assert os.listdir(tmp_path) == []
        # A parent the state directory and a socket share: it went before the socket's, so stayed.
        shared = [
            *("--zds-socket", f"{tmp_path}/x/z/z.sock", "--control-socket", f"{tmp_path}/x/c.sock"),
            *("--cni-socket", f"{tmp_path}/x/n.sock", "--state-dir", f"{tmp_path}/x/state"),
        ]
        done = subprocess.run(
            [*ZDS, "server", *shared, "--http-listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and "Address already in use" in done.stderr, done.stderr
        assert os.listdir(tmp_path) == []
