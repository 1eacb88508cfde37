"""Pods for ``zds check node-agent``: the network namespaces it makes for them, and how it
makes the node agent under test enroll and remove them.

The outcome of an add or a remove is judged on the wire, never by what the
command or the API call answered: the drivers only start them (in the
background, since an enrollment waits for ztunnel's ack, which the check
itself sends) and keep what they said for the report.

- ``ControlDriver``: zds's own control API (``AddPod``/``RemovePod`` over gRPC);
- ``CommandDriver``: a command per pod, from templates with ``{uid}``, ``{name}``,
  ``{namespace}``, ``{service_account}``, ``{netns}``, run with ``/bin/sh -c``
  (the values are shell-quoted), once per pod, exit status ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from zds import defaults
from zds.errors import ZdsError
from zds.netns.fixtures import create_netns, delete_netns
from zds.netns.kernel import netns_identity

if TYPE_CHECKING:
    from zds.check.remains import CheckRecord

#: Every pod the check makes lives in this namespace, with this service account.
POD_NAMESPACE = "zds-check"
SERVICE_ACCOUNT = "zds-check"
#: Named network namespaces the check makes start with this (``zds netns list`` shows them).
NETNS_PREFIX = "zdsck-"
#: Placeholders a command template may use.
PLACEHOLDERS = ("uid", "name", "namespace", "service_account", "netns")


class CheckSetupError(ZdsError):
    """The check cannot run at all (bad template, no netns); the message says what to change."""


@dataclass(frozen=True)
class CheckPod:
    """A pod the check made: who it is and its own network namespace."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns: str
    #: (st_dev, st_ino) of its netns: the fd in its AddWorkload must be this one.
    identity: tuple[int, int]

    def values(self) -> dict[str, str]:
        return {
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "netns": self.netns,
        }


@dataclass
class PodFactory:
    """Makes pods, each in a fresh named netns (in ``record`` before it has its name);
    ``close`` deletes every netns it made."""

    record: CheckRecord
    made: list[str] = field(default_factory=list)
    count: int = 0
    pods: dict[str, CheckPod] = field(default_factory=dict)

    def make(self) -> CheckPod:
        self.count += 1
        token = uuid.uuid4().hex[:8]
        name = f"{NETNS_PREFIX}{token}"
        path = create_netns(name, told=self.record.netns_told(name))
        self.made.append(name)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            identity = netns_identity(fd)
        finally:
            os.close(fd)
        pod = CheckPod(
            uid=str(uuid.uuid4()),
            name=f"check-{self.count}-{token}",
            namespace=POD_NAMESPACE,
            service_account=SERVICE_ACCOUNT,
            netns=path,
            identity=(identity.dev, identity.ino),
        )
        self.pods[pod.uid] = pod
        return pod

    def close(self) -> None:
        for name in self.made:
            with contextlib.suppress(ZdsError, OSError):
                delete_netns(name, missing_ok=True)
        self.made.clear()


class PodDriver(Protocol):
    """How pods come and go on the node agent under test."""

    def describe(self) -> str: ...
    async def ready(self) -> None: ...
    async def add(self, pod: CheckPod) -> str: ...
    async def remove(self, pod: CheckPod) -> str: ...
    async def close(self) -> None: ...


class ControlDriver:
    """zds's control API: AddPod / RemovePod on the control socket."""

    def __init__(self, control_socket: str) -> None:
        import grpc

        from zds.gen import nodeagent_pb2_grpc

        self.control_socket = control_socket
        self._channel = grpc.aio.insecure_channel(f"unix:{control_socket}", defaults.CONTROL_CLIENT_OPTIONS)
        self._stub = nodeagent_pb2_grpc.NodeAgentStub(self._channel)  # type: ignore[no-untyped-call]

    def describe(self) -> str:
        return f"pods via the control API at {self.control_socket}"

    async def ready(self) -> None:
        """The control API answers (ListPods); CheckSetupError in one line if not: every pod
        scenario would fail and blame the node agent for pods it was never given."""
        import grpc

        from zds.gen import nodeagent_pb2

        try:
            await self._stub.ListPods(nodeagent_pb2.ListPodsRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise CheckSetupError(
                f"cannot reach zds's control API at {self.control_socket} ({exc.code().name}: "
                f"{exc.details()}); give the node agent's --control-socket, or make pods come and go "
                "with --add-cmd/--remove-cmd"
            ) from exc

    async def add(self, pod: CheckPod) -> str:
        from zds.gen import nodeagent_pb2

        request = nodeagent_pb2.AddPodRequest(
            uid=pod.uid,
            name=pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            netns_path=pod.netns,
        )
        return await self._call(self._stub.AddPod, request)

    async def remove(self, pod: CheckPod) -> str:
        from zds.gen import nodeagent_pb2

        return await self._call(self._stub.RemovePod, nodeagent_pb2.RemovePodRequest(uid=pod.uid))

    async def _call(self, method: object, request: object) -> str:
        import grpc

        try:
            await method(request, timeout=60)  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "OK"

    async def close(self) -> None:
        await self._channel.close()


class CommandDriver:
    """Command templates, run once per pod with ``/bin/sh -c``."""

    def __init__(self, add_template: str, remove_template: str) -> None:
        for flag, template in (("--add-cmd", add_template), ("--remove-cmd", remove_template)):
            check_template(flag, template)
        self.add_template = add_template
        self.remove_template = remove_template

    def describe(self) -> str:
        return f"pods via --add-cmd {self.add_template!r} / --remove-cmd {self.remove_template!r}"

    async def ready(self) -> None:
        """Nothing to ask: the commands' outcome is judged on the wire."""

    async def add(self, pod: CheckPod) -> str:
        return await self._run(self.add_template, pod)

    async def remove(self, pod: CheckPod) -> str:
        return await self._run(self.remove_template, pod)

    async def _run(self, template: str, pod: CheckPod) -> str:
        command = fill(template, pod.values())
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace").strip().replace("\n", " | ")
        return f"exit {proc.returncode}" + (f": {text[:300]}" if text else "")

    async def close(self) -> None:
        return None


def fill(template: str, values: dict[str, str]) -> str:
    """The template with each ``{placeholder}`` replaced by its shell-quoted value."""
    return template.format_map({k: shlex.quote(v) for k, v in values.items()})


def check_template(flag: str, template: str, placeholders: tuple[str, ...] = PLACEHOLDERS) -> None:
    """Refuse a template that names a placeholder we do not fill (or is not a template)."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise CheckSetupError(f"{flag} {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    unknown = sorted({n for n in names if n not in placeholders})
    if unknown:
        raise CheckSetupError(
            f"{flag} {template!r}: unknown placeholder {{{unknown[0]}}}; use "
            + ", ".join(f"{{{p}}}" for p in placeholders)
        )
