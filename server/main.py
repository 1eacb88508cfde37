"""``zds server``: the node agent wired to its sockets and its state (``run.py`` runs it).

Start-up, in order, each step refusing in one line what it cannot do:

1. check what the flags name, claim every path (a lock beside each socket and in the
   state directory) and refuse a socket path another program serves: a second node agent
   for any of them stops here, having touched nothing (a start refused later removes what
   it made: ``_undo_claim``);
2. bind the ZDS socket (not yet accepting: as Istio's agent, whose listener is made before
   its snapshot, a ztunnel that connects during the next step waits in the backlog and gets
   its snapshot once served, instead of backing off on a refused connect for up to 15 s);
   open the pod store and recover from it (netns reopened and checked, rules
   checked), then preload ``--pods`` (the store wins for a uid both name), then arm
   ``--faults`` (for the first connection accepted);
3. only then serve: control API, CNI plugin endpoint, HTTP, then ZDS (accepting). A socket
   path is only cleared when it holds a stale socket, and on exit only the
   socket this process bound is removed;
4. with ``--container-engine``, follow the engine's containers (list,
   reconcile with the recovered pods, watch); an engine that does not answer
   is retried, never fatal, and keeps ``/readyz`` at 503 until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from zds import runtime
from zds.aio import cancel_and_wait
from zds.httpguard import TcpGuard
from zds.server import socketaccess, storefile
from zds.server.agent import NodeAgent
from zds.server.bulkadd import bulk_add
from zds.server.cni import CniPluginEndpoint
from zds.server.containerpods import ContainerPods
from zds.server.control import ControlServers, start_control_server
from zds.server.engine import ContainerEngineSource
from zds.server.http import health_app
from zds.server.instance import InstanceError, InstanceLock, PrivateDir, remove_dirs, state_lock
from zds.server.netnspolicy import NetnsPolicy, NetnsRootUnsafe, NodeNetnsUnknown
from zds.server.netnssweep import NetnsSweep
from zds.server.options import ServerOptions, StartupError, control_tcp, host_port, split_host_port
from zds.server.otelenv import TelemetryConfigError
from zds.server.outcomes import EnrollmentError
from zds.server.peergate import PeerGate
from zds.server.peers import PeerGuard
from zds.server.pods import PodSpec, PodSpecError
from zds.server.recovery import recover
from zds.server.redirect import RedirectError, node_config, serving_redirector
from zds.server.startup import Claim, check_ports, claim_paths, clear_sockets, read_flags
from zds.server.store import PodStore
from zds.server.storefile import StoreError, remove_if_unused
from zds.server.storefile import exists as store_exists
from zds.server.telemetry import Telemetry
from zds.server.unixhttp import GuardedUnixHttp
from zds.transport import SocketFile, SocketPathTaken, bind_unix_listener, clear_socket_path

if TYPE_CHECKING:
    from zds.server.faults import FaultSpec

log = logging.getLogger("zds.server")


class NodeAgentServer:
    """Everything ``zds server`` runs; ``start`` then ``stop`` (always, also after a failed start)."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        try:
            self.telemetry = options.telemetry or Telemetry.from_environment()
        except TelemetryConfigError as exc:
            raise StartupError(f"cannot set up OpenTelemetry: {exc}") from exc
        try:
            backend = options.redirect_backend
            rules = (
                serving_redirector(backend, node_config(backend, options.redirect_config))
                if options.redirect
                else None
            )
        except RedirectError as exc:
            raise StartupError(str(exc)) from exc
        try:
            policy = NetnsPolicy.for_this_node(options.netns_roots)
        except (NodeNetnsUnknown, NetnsRootUnsafe) as exc:
            raise StartupError(str(exc)) from exc
        self.agent = NodeAgent(
            options.agent, rules, self.telemetry, netns_policy=policy, redirect_config=options.redirect_config
        )
        self.store: PodStore | None = None
        #: The pod store could not be written out as it closed (the exit status says so).
        self.store_lost = False
        self.cni: CniPluginEndpoint | None = None
        self.containers = ContainerPods(self.agent)
        #: Who the socket flags let in besides root and this process's uid.
        self._peers = socketaccess.Peers.of(options, self.agent.config.allow)
        self.engine: ContainerEngineSource | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._lock = InstanceLock()
        self._grpc: ControlServers | None = None
        #: Where the control API listens on TCP (HOST:PORT, the port picked for 0); None: it does not.
        self.grpc_address: str | None = None
        #: Where the HTTP endpoints listen, as bound (an ephemeral port resolved).
        self.http_address: str | None = None
        self._gate: PeerGate | None = None
        self._private: PrivateDir | None = None
        self._runners: list[web.AppRunner] = []
        #: What else must be closed at stop (guarded endpoints).
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._zds_task: asyncio.Task[None] | None = None
        #: The ZDS socket, bound and not yet served (``_serve_zds`` hands it to the accept loop).
        self._zds_listener: socket.socket | None = None
        self._sockets: list[SocketFile] = []
        #: The state directory held a node agent before this one (its lock file was there).
        self._used_before = False
        #: What claiming every path found (None: not claimed, so there is nothing to stop).
        self._claim: Claim | None = None
        #: This start made the pod store (none was there, or --reset-state moved it aside).
        self._store_made = False
        #: Where --reset-state moved the old store (put back if the start is refused).
        self._aside: str | None = None
        self._ready = False
        #: ``start`` went to its end.
        self._started = False
        #: ``start`` is in its long steps (the recovery, a --pods preload), where a stop may
        #: cancel it; not once it serves (a server it starts must be there for ``stop``).
        self.cuttable = False

    def readiness(self, *, engine: bool = True) -> tuple[bool, str]:
        """``/readyz``'s answer (``engine``: the container engine counts)."""
        if not self._ready:
            return False, "starting"
        if self._zds_task is None or self._zds_task.done():
            return False, "ZDS listener is down"
        if engine and self.engine is not None and not self.engine.up:
            return False, f"{self.engine.name} is down: {self.engine.detail}"
        if self.store is not None and self.store.probe():  # (no pod can be enrolled)
            return False, f"the pod store's last write failed: {self.store.failing}"
        return (
            True,
            f"ready: {len(self.agent.connections)} ztunnel connection(s), {len(self.agent.pods)} pod(s)",
        )

    async def start(self) -> None:
        opts = self.options
        pods, faults = read_flags(opts)
        self._control_tcp = control_tcp(opts)  # (its TLS files read once, before anything is claimed)
        self._claim = claim_paths(opts, self._lock)
        self._used_before = self._claim.used_before
        check_ports(opts)
        clear_sockets(opts)
        self._listen_zds()
        self.cuttable = True
        await self._restore_state()
        if opts.pods_file:
            await self._load_pods(opts.pods_file, pods)
        self.cuttable = False
        if opts.faults_file:
            self._arm_faults(opts.faults_file, faults)
        await self._serve_control()
        if opts.cni_socket:
            await self._serve_cni(opts.cni_socket)
        if opts.http_listen:
            await self._serve_http(opts.http_listen)
        socketaccess.say_kept_out(opts, self._peers)
        self._serve_zds()  # (last: a start refused above sends a waiting ztunnel no snapshot)
        if opts.container_engine:
            self.engine = ContainerEngineSource(
                opts.container_engine, self.containers, self.agent.tasks, opts.container_label
            )
            self._engine_task = asyncio.create_task(self.engine.run(), name="container-engine")
        if opts.netns_sweep:
            self.agent.tasks.spawn(NetnsSweep(self.containers, opts.netns_sweep).run(), name="netns-sweep")
        self._ready = self._started = True
        runtime.started()  # (zds.cli held garbage collection for the start-up)
        log.info(
            "node agent ready: zds=%s control=%s cni=%s http=%s grpc=%s state=%s engine=%s pods=%d rules=%s "
            "tracing=%s",
            opts.zds_socket,
            opts.control_socket,
            opts.cni_socket or "off",
            self.http_address or "off",
            self.grpc_address or "off",
            opts.state_dir,
            opts.container_engine or "off",
            len(self.agent.pods),
            opts.redirect_backend if opts.redirect else "off",
            "on" if self.telemetry.tracing else "off",
        )

    # -- start-up steps --------------------------------------------------------------
    async def _restore_state(self) -> None:
        opts = self.options
        try:
            if opts.reset_state:
                self._aside = storefile.reset(opts.state_dir)
                if self._aside:
                    log.warning(
                        "--reset-state: the old pod store was moved to %s; starting empty", self._aside
                    )
                self._used_before = False
            fresh = not store_exists(opts.state_dir)
            self.store = PodStore.open(opts.state_dir, used_before=self._used_before)
            self._store_made = fresh  # (one that failed to open removed what it made itself)
        except StoreError as exc:
            if self._aside is not None and storefile.put_back(self._aside, opts.state_dir):
                raise StartupError(f"{exc} (--reset-state undone: the old pod store is back)") from exc
            raise StartupError(str(exc)) from exc
        try:
            self.agent.use_store(self.store)
            await recover(self.store, self.agent.enrollment)
        except StoreError as exc:
            raise StartupError(str(exc)) from exc
        self.store.checkpoint()

    async def _load_pods(self, path: str, specs: list[PodSpec]) -> None:
        """Preload a pods file's pods; a uid the store already holds (with its netns, or one
        it could not open now) keeps the stored pod."""
        loaded = 0
        for spec in specs:
            held = self.agent.pods.get(spec.uid)
            if held is not None and (held.netns is not None or held.unopened is not None):
                log.info(
                    "pods file entry skipped: the pod store holds this pod already", extra=spec.log_extra
                )
                continue
            try:
                await self.agent.load(spec)
                loaded += 1
            except (PodSpecError, EnrollmentError) as exc:
                log.error("pods file entry refused: %s", exc, extra={"uid": spec.uid})
        log.info("loaded %d pod(s) from %s", loaded, path)

    def _arm_faults(self, path: str, faults: list[FaultSpec]) -> None:
        """Arm every fault of a faults file; one that cannot be armed stops the start-up."""
        from zds.server.faultkinds import FaultError

        try:
            for spec in faults:
                self.agent.inject_fault(spec)
        except FaultError as exc:
            raise StartupError(f"--faults {path}: {exc}") from exc

    def _listen_zds(self) -> None:
        """Bind the ZDS socket; connections wait in its backlog until ``_serve_zds``."""
        path = self.options.zds_socket
        try:
            clear_socket_path(path)
            self._zds_listener = bind_unix_listener(path, mode=self.options.socket_mode)
        except (InstanceError, SocketPathTaken) as exc:
            raise StartupError(f"cannot listen on ZDS socket: {exc}") from exc
        except OSError as exc:
            raise StartupError(f"cannot listen on ZDS socket {path}: {exc}") from exc
        self._own(path)

    def _serve_zds(self) -> None:
        listener, self._zds_listener = self._zds_listener, None
        assert listener is not None
        self._zds_task = asyncio.create_task(self.agent.serve_zds(listener), name="zds-accept")
        self._zds_task.add_done_callback(lambda _: listener.close())

    async def _serve_control(self) -> None:
        """gRPC on a private socket (a 0700 directory), the public control socket a gate that
        checks each peer first; on TCP only with TLS, or plaintext if --grpc-insecure said so."""
        opts = self.options
        path = opts.control_socket
        tcp, tls = self._control_tcp
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            clear_socket_path(path)
        except (InstanceError, SocketPathTaken) as exc:
            raise StartupError(f"cannot listen on control socket: {exc}") from exc
        except OSError as exc:
            raise StartupError(f"cannot listen on control socket {path}: {exc}") from exc
        try:
            self._private = PrivateDir.claim(path)
        except InstanceError as exc:
            raise StartupError(f"cannot serve the control API: {exc}") from exc
        private = self._private.socket
        try:
            self._grpc, port = await start_control_server(self.agent, private, tcp, tls)
        except Exception as exc:
            where = f"{path}" + (f" and {opts.grpc_listen}" if opts.grpc_listen else "")
            raise StartupError(f"cannot serve the control API on {where}: {exc}") from exc
        self._gate = PeerGate(
            private,
            PeerGuard(self.agent.config.allow, "control"),
            functools.partial(bulk_add, self.agent),
        )
        try:
            await self._gate.start(path, opts.socket_mode)
        except OSError as exc:
            raise StartupError(f"cannot listen on control socket {path}: {exc}") from exc
        self._own(path)
        if tcp is None or port is None or opts.grpc_listen is None:
            return
        host, _ = split_host_port(opts.grpc_listen, "--grpc-listen")
        self.grpc_address = host_port(host, port)
        log.info("control API (gRPC) listening on %s (%s)", self.grpc_address, "TLS" if tls else "plaintext")
        if tls is None:
            log.warning(
                "the control API is served in PLAINTEXT on %s (--grpc-insecure): anyone who can reach it "
                "can enroll pods into any allowed netns; use --tls-cert/--tls-key instead",
                self.grpc_address,
            )

    def _own(self, path: str) -> None:
        self._sockets.append(SocketFile.of(path))  # (first: a start refused below removes it)
        try:
            socketaccess.give(path, self.options, self._peers, self._lock.made_dirs)
        except OSError as exc:
            raise StartupError(
                f"cannot open {path} to --socket-group/--allow-uid/--allow-gid "
                f"({len(self._peers.uids) + len(self._peers.gids)} ACL entries asked for): {exc.strerror or exc}"
            ) from exc

    async def _serve_cni(self, path: str) -> None:
        self.cni = CniPluginEndpoint(
            self.agent, self.containers, lambda engine: self.readiness(engine=engine)
        )
        http = GuardedUnixHttp(
            self.cni.app, PeerGuard(self.agent.config.allow, "CNI plugin"), self.options.cni_limits
        )
        self._closers.append(http.close)
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            clear_socket_path(path)
            await http.start(path, self.options.socket_mode)
        except (InstanceError, SocketPathTaken) as exc:
            raise StartupError(f"cannot listen on CNI plugin socket: {exc}") from exc
        except OSError as exc:
            raise StartupError(f"cannot listen on CNI plugin socket {path}: {exc}") from exc
        self._own(path)

    async def _serve_http(self, listen: str) -> None:
        host, port = split_host_port(listen, "--http-listen")
        guard = TcpGuard()
        app = health_app(self.readiness, self.telemetry.prometheus, middlewares=(guard.middleware,))
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=guard.header_timeout)
        await runner.setup()
        self._runners.append(runner)
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(guard.protocol(runner.server), host, port, backlog=128)
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {listen}: {exc}") from exc

        async def close() -> None:
            server.close()
            guard.flush()

        self._closers.append(close)
        bound = server.sockets[0].getsockname()
        self.http_address = host_port(bound[0], bound[1])
        log.info("HTTP (/healthz, /readyz, /metrics) listening on %s", self.http_address)

    # -- running and stopping -----------------------------------------------------------
    async def wait(self) -> None:
        """Until the ZDS accept loop ends (it only does on failure or stop)."""
        if self._zds_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._zds_task

    async def stop(self, *, refused: bool = False) -> None:
        self._ready = False
        self.agent.enrollment.stopping = True
        self.containers.stop()  # (a CNI ADD waiting for its container is answered now)
        # No new gRPC call from here on (one that came during the bulk lanes' grace started an
        # enrollment the last cancel_all cut short); those under way have 0.5 s to answer.
        grpc_stop = asyncio.ensure_future(self._grpc.stop(grace=0.5)) if self._grpc is not None else None
        try:
            if self._engine_task is not None:
                await cancel_and_wait(self._engine_task)
            if self._zds_task is not None:
                await cancel_and_wait(self._zds_task)
            # Watchers get what is queued (the disconnections just now), then UNAVAILABLE.
            self.agent.events.close("node agent shutting down")
            # Enrollments cut short now, while their callers (bulk lanes, gRPC) can still be
            # told whether each pod was stored; then those streams end.
            await self.agent.tasks.cancel_all()
            if self._gate is not None:
                await self._gate.close()
        finally:
            if grpc_stop is not None:
                await grpc_stop
        if self._private is not None:
            self._private.remove()
        for runner in self._runners:
            await runner.cleanup()
        for close in self._closers:
            await close()
        # Outstanding enrollments and removals finish (or are cancelled) before the store closes.
        await self.agent.tasks.cancel_all()
        self.telemetry.hold_pods()
        self.agent.close()
        if self.store is not None:
            try:
                self.store.close()
            except StoreError as exc:
                log.error("%s", exc)
                self.store_lost = True
        if self._zds_listener is not None:  # (a start refused or stopped before it was served)
            self._zds_listener.close()
        for socket_file in self._sockets:
            socket_file.remove()
        made: list[str] = []
        if self._claim is not None and not self._started:
            made = self._undo_claim(self._claim)
        self._lock.remove_socket_locks(served=self._started)
        remove_dirs(made)  # (after the lock's own: a parent they share goes last)
        self._lock.release()
        await self.telemetry.shutdown()
        if self._claim is not None and not refused:  # (a refused start says so in one line)
            log.info("node agent stopped")

    def _undo_claim(self, claim: Claim) -> list[str]:
        """A start refused once its paths were claimed leaves nothing of its own: the pod store
        it made (unless a pod went in: ``--pods`` loads them before the sockets are served),
        the lock files it made (the state directory's stays with such a store); the
        directories it made for the state directory, to remove once empty (none if kept)."""
        state_dir = self.options.state_dir
        keep = []
        if self._store_made and not remove_if_unused(state_dir):
            keep.append(state_lock(state_dir))
        elif self._aside is not None and storefile.put_back(self._aside, state_dir):
            log.info("--reset-state undone: the old pod store is back")
            keep.append(state_lock(state_dir))
        self._lock.remove_made(keep)
        return [] if keep else claim.made_dirs
