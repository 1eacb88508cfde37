"""``zds cni install|uninstall``: put zds-cni where a CNI runtime finds it, and take it out."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from zds import defaults, runtime
from zds.errors import printable


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "cni",
        help="install or uninstall zds's CNI plugin (zds-cni)",
        description="Install zds-cni into a CNI bin dir and chain it into a network's config list, "
        "as Istio's install-cni does; uninstall takes it out again.",
    )
    commands = parser.add_subparsers(dest="cni_command", metavar="SUBCOMMAND", required=True)
    install = commands.add_parser(
        "install",
        help="put zds-cni into the bin dir and chain it into a network",
        description="Put the zds-cni executable into --bin-dir and append zds-cni to the plugins of a "
        "network's config list in --conf-dir (the one named with --network, else the lexically first "
        "valid config, as kubelet picks it). Everything else in the file stays as it was; a "
        "single-plugin .conf becomes a .conflist (the original is kept for uninstall). Idempotent.",
    )
    _dirs(install)
    install.add_argument(
        "--network",
        metavar="NAME",
        help="the network to chain into, by its config's name (default: the first)",
    )
    install.add_argument(
        "--cni-socket",
        metavar="PATH",
        help=f"the node agent's CNI socket, written into the plugin's config (default: what the "
        f"network's zds-cni entry has, else {defaults.CNI_SOCKET})",
    )
    install.add_argument(
        "--log-file",
        metavar="PATH",
        help=f"where zds-cni logs, written into its config (default: what the network's zds-cni entry "
        f"has, else {defaults.CNI_PLUGIN_LOG})",
    )
    install.add_argument(
        "--enroll",
        choices=("labelled", "all"),
        help="labelled: the container's istio.io/dataplane-mode label decides (the node agent reads it "
        "through its --container-engine); all: every pod on the network joins (default: what the "
        "network's zds-cni entry has, else labelled)",
    )
    install.set_defaults(func=cmd_install)
    uninstall = commands.add_parser(
        "uninstall",
        help="take zds-cni out of the network configs and remove it from the bin dir",
        description="Take zds-cni's entry out of every config list in --conf-dir, or only the one "
        "named with --network (leaving the rest of each file as it was, and restoring a .conf "
        "install converted), and remove the zds-cni executable from --bin-dir unless a network "
        "in --conf-dir still chains it.",
    )
    _dirs(uninstall)
    uninstall.add_argument(
        "--network",
        metavar="NAME",
        help="only the network with this name (its config's name) (default: every network)",
    )
    uninstall.set_defaults(func=cmd_uninstall)


def _dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bin-dir",
        default=defaults.CNI_BIN_DIR,
        type=_directory,
        metavar="DIR",
        help="where the CNI runtime finds plugins (Podman on Debian also searches /usr/lib/cni) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--conf-dir",
        default=defaults.CNI_CONF_DIR,
        type=_directory,
        metavar="DIR",
        help="where the CNI runtime reads network configs (default: %(default)s)",
    )


def _directory(text: str) -> str:
    """A directory flag's path, absolute (relative: the launcher's check runs it from /); not
    empty (``os.path.abspath("")`` is the working directory: zds-cni went there)."""
    if not text:
        raise argparse.ArgumentTypeError("give a directory (an empty path names none)")
    return os.path.abspath(text)


def cmd_install(args: argparse.Namespace) -> int:
    from zds.cni.install import InstallOptions, install

    options = InstallOptions(
        bin_dir=args.bin_dir,
        conf_dir=args.conf_dir,
        network=args.network,
        cni_socket=args.cni_socket,
        log_file=args.log_file,
        enroll=args.enroll,
    )
    return _run("install", lambda: install(options))


def cmd_uninstall(args: argparse.Namespace) -> int:
    from zds.cni.install import InstallOptions, uninstall

    options = InstallOptions(bin_dir=args.bin_dir, conf_dir=args.conf_dir, network=args.network)
    return _run("uninstall", lambda: uninstall(options))


def _run(verb: str, action: Callable[[], list[str]]) -> int:
    """Runs an install or uninstall and prints the files it changed. SIGTERM and SIGHUP as
    Ctrl-C, and all three wait for the end (a tenth of a second): one that landed mid-way left
    a temporary file in the conf or bin dir, or a .conf beside the .conflist made from it (two
    configs of one network). Then the exit says the signal."""
    from zds.cni.launcher import InstallError

    with runtime.Interrupts(), runtime.interrupts_held():
        try:
            done = action()
        except (InstallError, OSError) as exc:
            print(f"zds cni {verb}: {printable(str(exc))}", file=sys.stderr)
            return 1
        print("\n".join(printable(line) for line in done))  # (file names in the conf dir: anyone's)
    return 0
