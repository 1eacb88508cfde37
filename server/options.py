"""What ``zds server`` is started with (its flags, once parsed), and the checks
that refuse a combination of them in one line before anything is opened."""

from __future__ import annotations

from dataclasses import dataclass, field

from zds import defaults
from zds.errors import ZdsError, resolvable_name
from zds.server.agent import AgentConfig
from zds.server.control import TlsFiles
from zds.server.inpodrules import RedirectConfig
from zds.server.telemetry import Telemetry
from zds.server.unixhttp import HttpLimits


class StartupError(ZdsError):
    """The node agent cannot start; the message says why and what to do."""


@dataclass
class ServerOptions:
    zds_socket: str = defaults.ZDS_SOCKET
    control_socket: str = defaults.CONTROL_SOCKET
    grpc_listen: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    #: Serve --grpc-listen in plaintext (a warning is logged).
    grpc_insecure: bool = False
    cni_socket: str | None = defaults.CNI_SOCKET
    cni_limits: HttpLimits = field(default_factory=HttpLimits)
    http_listen: str | None = defaults.NODE_AGENT_HTTP
    state_dir: str = defaults.STATE_DIR
    #: Move an existing pod store aside and start empty.
    reset_state: bool = False
    pods_file: str | None = None
    #: Directories besides /var/run/netns and /run/netns that hold pods' named namespaces.
    netns_roots: tuple[str, ...] = ()
    #: Mode of every socket file: 0600, or 0660 with --socket-group.
    socket_mode: int = defaults.SOCKET_MODE
    #: The group of every socket file (--socket-group), or None to leave it root's.
    socket_gid: int | None = None
    #: A Docker-compatible API socket (Podman's or Docker's): containers become pods.
    container_engine: str | None = None
    #: Only the engine's containers with these labels (KEY or KEY=VALUE) are this node agent's.
    container_label: tuple[str, ...] = ()
    #: How often pods of CNI events whose netns is gone are looked for and removed (0: never).
    netns_sweep: float = defaults.NETNS_SWEEP
    #: Faults to arm at start-up (zds server --faults), for testing a ztunnel.
    faults_file: str | None = None
    redirect: bool = True
    #: One of ``defaults.REDIRECT_BACKENDS``.
    redirect_backend: str = defaults.REDIRECT_BACKEND
    redirect_config: RedirectConfig = field(default_factory=RedirectConfig)
    agent: AgentConfig | None = None
    #: None: from the OTEL_* environment variables (tests pass their own).
    telemetry: Telemetry | None = None


def split_host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise StartupError(f"{flag} {value!r}: expected HOST:PORT")
    if int(port) > 65535:  # (the kernel would take it modulo 65536)
        raise StartupError(f"{flag} {value!r}: port {port} is not a TCP port (0-65535)")
    if not resolvable_name(host := host.strip("[]")):
        raise StartupError(f"{flag} {value!r}: {host!r} is no host name or address")
    return host or "0.0.0.0", int(port)


def host_port(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def control_tcp(opts: ServerOptions) -> tuple[str | None, TlsFiles | None]:
    """Where the control API listens on TCP, and with which TLS; StartupError for a
    combination that would serve it in plaintext unasked, or TLS files it cannot read."""
    tls_flags = opts.tls_cert or opts.tls_key or opts.tls_client_ca
    if not opts.grpc_listen:
        if tls_flags:
            raise StartupError("--tls-cert, --tls-key and --tls-client-ca only apply with --grpc-listen")
        if opts.grpc_insecure:
            raise StartupError("--grpc-insecure only applies with --grpc-listen")
        return None, None
    host, port = split_host_port(opts.grpc_listen, "--grpc-listen")
    tcp = host_port(host, port)
    if opts.grpc_insecure:
        if tls_flags:
            raise StartupError("--grpc-insecure and --tls-cert/--tls-key contradict each other; pick one")
        return tcp, None
    if not (opts.tls_cert and opts.tls_key):
        raise StartupError(
            "--grpc-listen needs --tls-cert and --tls-key (the control API can enroll pods and "
            "rewrite their firewalls: never serve it in plaintext on a network), or --grpc-insecure "
            "to do so anyway"
        )
    cert = _pem("--tls-cert", opts.tls_cert, "CERTIFICATE-----")
    key = _pem("--tls-key", opts.tls_key, "PRIVATE KEY-----")
    ca = _pem("--tls-client-ca", opts.tls_client_ca, "CERTIFICATE-----") if opts.tls_client_ca else None
    return tcp, TlsFiles(cert, key, ca)


def _pem(flag: str, path: str, marker: str) -> bytes:
    """The PEM file at ``path``, read now (a FIFO with no writer, a directory, a file over
    1 MiB or one with no ``-----BEGIN ...marker`` is refused: they blocked the start, were
    refused after the store was opened, or made gRPC say it could not bind)."""
    from zds.entryfile import read_tls_file

    try:
        data = read_tls_file(flag, path)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise StartupError(f"{flag} {path}: no PEM {marker.removesuffix('-----').lower()} in it")
    return data
