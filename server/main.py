"""``zds server``: wire the node agent to its sockets and run until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from zds import defaults
from zds.errors import ZdsError
from zds.server.agent import AgentConfig, NodeAgent
from zds.server.cni import CniPluginEndpoint
from zds.server.control import start_control_server
from zds.server.enrollment import EnrollmentError
from zds.server.http import health_app
from zds.server.pods import PodSpecError
from zds.server.podsfile import load_pods_file
from zds.server.redirect import RedirectConfig, Redirector
from zds.server.tasks import cancel_and_wait
from zds.server.telemetry import Telemetry, TelemetryConfigError
from zds.transport import bind_unix_listener, remove_socket_file, remove_stale_socket

log = logging.getLogger("zds.server")


class StartupError(ZdsError):
    """The node agent cannot start; the message says why and what to do."""


@dataclass
class ServerOptions:
    zds_socket: str = defaults.ZDS_SOCKET
    control_socket: str = defaults.CONTROL_SOCKET
    grpc_listen: str | None = None
    cni_socket: str | None = defaults.CNI_SOCKET
    http_listen: str | None = defaults.NODE_AGENT_HTTP
    pods_file: str | None = None
    redirect: bool = True
    redirect_config: RedirectConfig = field(default_factory=RedirectConfig)
    agent: AgentConfig | None = None
    #: None: from the OTEL_* environment variables (tests pass their own).
    telemetry: Telemetry | None = None


def split_host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(f"{flag} {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _start_unix_http(app: web.Application, path: str, mode: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        remove_stale_socket(path)
        await web.UnixSite(runner, path).start()
        os.chmod(path, mode)
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class NodeAgentServer:
    """Everything ``zds server`` runs; ``start`` then ``stop`` (always, also after a failed start)."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        try:
            self.telemetry = options.telemetry or Telemetry.from_environment()
        except TelemetryConfigError as exc:
            raise StartupError(f"cannot set up OpenTelemetry: {exc}") from exc
        self.agent = NodeAgent(
            options.agent,
            Redirector(options.redirect_config) if options.redirect else None,
            self.telemetry,
        )
        self.cni: CniPluginEndpoint | None = None
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._zds_task: asyncio.Task[None] | None = None
        self._sockets: list[str] = []
        self._ready = False

    def readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "starting"
        if self._zds_task is None or self._zds_task.done():
            return False, "ZDS listener is down"
        return (
            True,
            f"ready: {len(self.agent.connections)} ztunnel connection(s), {len(self.agent.pods)} pod(s)",
        )

    async def start(self) -> None:
        opts = self.options
        if opts.pods_file:
            await self._load_pods(opts.pods_file)
        try:
            listener = bind_unix_listener(opts.zds_socket, mode=defaults.ZDS_SOCKET_MODE)
        except OSError as exc:
            raise StartupError(f"cannot listen on ZDS socket {opts.zds_socket}: {exc}") from exc
        self._sockets.append(opts.zds_socket)
        self._zds_task = asyncio.create_task(self.agent.serve_zds(listener), name="zds-accept")
        self._zds_task.add_done_callback(lambda _: listener.close())

        addresses = [f"unix:{opts.control_socket}"]
        try:
            os.makedirs(os.path.dirname(opts.control_socket) or ".", mode=0o750, exist_ok=True)
            remove_stale_socket(opts.control_socket)
        except OSError as exc:
            raise StartupError(f"cannot listen on control socket {opts.control_socket}: {exc}") from exc
        if opts.grpc_listen:
            host, port = split_host_port(opts.grpc_listen, "--grpc-listen")
            addresses.append(f"{host}:{port}")
        # gRPC creates the socket file itself: a umask makes it 0600 from the start.
        old_umask = os.umask(0o777 & ~defaults.CONTROL_SOCKET_MODE)
        try:
            self._grpc = await start_control_server(self.agent, addresses)
        except Exception as exc:
            raise StartupError(f"cannot serve the control API on {', '.join(addresses)}: {exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(opts.control_socket, defaults.CONTROL_SOCKET_MODE)
        self._sockets.append(opts.control_socket)

        if opts.cni_socket:
            self.cni = CniPluginEndpoint(self.agent)
            try:
                self._runners.append(await _start_unix_http(self.cni.app, opts.cni_socket, 0o600))
            except OSError as exc:
                raise StartupError(f"cannot listen on CNI plugin socket {opts.cni_socket}: {exc}") from exc
            self._sockets.append(opts.cni_socket)
        if opts.http_listen:
            host, port = split_host_port(opts.http_listen, "--http-listen")
            runner = web.AppRunner(health_app(self.readiness, self.telemetry.prometheus), access_log=None)
            await runner.setup()
            self._runners.append(runner)
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise StartupError(f"cannot listen for HTTP on {opts.http_listen}: {exc}") from exc
        self._ready = True
        log.info(
            "node agent ready: zds=%s control=%s cni=%s http=%s grpc=%s pods=%d tracing=%s",
            opts.zds_socket,
            opts.control_socket,
            opts.cni_socket or "off",
            opts.http_listen or "off",
            opts.grpc_listen or "off",
            len(self.agent.pods),
            "on" if self.telemetry.tracing else "off",
        )

    async def _load_pods(self, path: str) -> None:
        try:
            specs = load_pods_file(path)
        except PodSpecError as exc:
            raise StartupError(str(exc)) from exc
        for spec in specs:
            try:
                await self.agent.load(spec)
            except (PodSpecError, EnrollmentError) as exc:
                log.error("pods file entry refused: %s", exc, extra={"uid": spec.uid})
        log.info("loaded %d pod(s) from %s", len(self.agent.pods), path)

    async def wait(self) -> None:
        """Until the ZDS accept loop ends (it only does on failure or stop)."""
        if self._zds_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._zds_task

    async def stop(self) -> None:
        self._ready = False
        if self._zds_task is not None:
            await cancel_and_wait(self._zds_task)
        # Watchers get what is queued (the disconnections just now), then UNAVAILABLE.
        self.agent.events.close("node agent shutting down")
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
        for runner in self._runners:
            await runner.cleanup()
        self.agent.close()
        for path in self._sockets:
            remove_socket_file(path)
        await self.telemetry.shutdown()
        log.info("node agent stopped")


async def run_server(options: ServerOptions) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 when it cannot start."""
    try:
        server = NodeAgentServer(options)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        waiter = asyncio.create_task(server.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if waiter.done() and not stop.is_set():
            log.error("ZDS accept loop ended unexpectedly")
            return 1
        waiter.cancel()
        return 0
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
