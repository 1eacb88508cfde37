"""Reaching the node agent's control API from the client commands (``zds pod``,
``zds connections``, ``zds watch``, ``zds netns delete``): over its unix socket, or over
TCP with TLS (``--grpc-address`` with ``--tls-ca``, ``--tls-cert``/``--tls-key`` for
mutual TLS, or ``--grpc-insecure``). Every failure becomes one line for the user, and
"permission denied" when that is what happened."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from zds import defaults, runtime
from zds.errors import ZdsError

if TYPE_CHECKING:
    from socket import socket as Socket

    import grpc


class ControlError(ZdsError):
    """A control call failed; the message is ready for the user."""


#: What gRPC says when it never reached the server.
_TRANSPORT = (
    "failed to connect",
    "connection refused",
    "no such file",
    "connections to all backends failing",
)
_NOT_ROOT_HINT = (
    " (you are not root: the node agent lets in root and the uids and gids it was told to: "
    "zds server --allow-uid, --allow-gid, --socket-group)"
)
#: ... when the socket file itself kept this user out (EACCES at connect).
_FILE_HINT = (
    " (you are not root, and the socket file is not open to you: zds server --socket-group GROUP gives "
    "it to a group of yours; --allow-uid/--allow-gid let you past the node agent's check only)"
)


class ControlTarget(NamedTuple):
    """Where the control API is and how to talk to it. (A NamedTuple, not a dataclass:
    ``dataclasses`` alone is ~5 ms of ``zds pod add``'s start-up.)"""

    socket: str
    address: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControlTarget:
        """The target the flags name; ControlError for flags that do not go together (a TLS
        flag without --grpc-address was ignored: the control socket takes no TLS)."""
        tls = [
            f"--{f.replace('_', '-')}" for f in ("tls_ca", "tls_cert", "tls_key") if getattr(args, f, None)
        ]
        if tls and not getattr(args, "grpc_address", None):
            raise ControlError(f"{tls[0]} only applies with --grpc-address (the control socket takes no TLS)")
        if tls and getattr(args, "grpc_insecure", False):
            raise ControlError(f"{tls[0]} and --grpc-insecure exclude each other (TLS, or plaintext)")
        return cls(
            socket=args.control_socket,
            address=getattr(args, "grpc_address", None),
            tls_ca=getattr(args, "tls_ca", None),
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
            insecure=getattr(args, "grpc_insecure", False),
        )

    @property
    def where(self) -> str:
        return self.address or self.socket

    @contextmanager
    def stub(self) -> Iterator[Any]:
        """A ``zds.v1.NodeAgent`` stub on a channel to the node agent (closed afterwards)."""
        runtime.logs_needed()  # gRPC logs (a command may have left logging for now)
        from zds.gen import nodeagent_pb2_grpc  # gRPC: loaded when a call is made (~45 ms)

        with self._channel() as channel:
            yield nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]

    def _channel(self) -> grpc.Channel:
        import grpc

        if self.address is None:
            self.check_socket()
            return grpc.insecure_channel(f"unix:{self.socket}", defaults.CONTROL_CLIENT_OPTIONS)
        if self.insecure:
            return grpc.insecure_channel(self.address, defaults.CONTROL_CLIENT_OPTIONS)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ControlError("--tls-cert and --tls-key go together (mutual TLS)")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_pem("--tls-ca", self.tls_ca),
            private_key=_read_pem("--tls-key", self.tls_key),
            certificate_chain=_read_pem("--tls-cert", self.tls_cert),
        )
        return grpc.secure_channel(self.address, credentials, defaults.CONTROL_CLIENT_OPTIONS)

    def check_socket(self) -> None:
        """ControlError unless the unix socket is there and may be reached."""
        try:
            os.stat(self.socket)
        except PermissionError:
            raise self._denied() from None
        except FileNotFoundError:
            raise ControlError(
                f"cannot reach the node agent: {self.socket} does not exist; is `zds server` running "
                "(or does it use another --control-socket)?"
            ) from None
        except OSError as exc:  # (a directory in the path that is not one, a symlink loop)
            raise ControlError(f"cannot reach the node agent: {self.socket}: {exc.strerror or exc}") from None

    def lane(self, timeout: float) -> Socket:
        """A connection to the unix socket for the bulk lane (``bulkwire``), or ControlError."""
        from zds.server import bulkwire

        self.check_socket()
        try:
            return bulkwire.connect(self.socket, timeout)
        except PermissionError:
            raise self._denied() from None
        except TimeoutError:
            raise ControlError(
                f"cannot reach the node agent at {self.socket}: it did not take the connection "
                f"within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"cannot reach the node agent at {self.socket}: {exc.strerror or exc}"
            ) from None

    def _denied(self) -> ControlError:
        return ControlError(
            f"cannot reach the node agent at {self.where}: permission denied{not_root_hint(_FILE_HINT)}"
        )

    def failure(self, exc: grpc.RpcError) -> ControlError:
        """A failed call, as one line."""
        import grpc

        code, details = exc.code(), exc.details() or ""
        lowered = details.lower()
        if code is not grpc.StatusCode.UNAVAILABLE:
            # The node agent answered: its own words, whatever they say (a netns it may not
            # open is "permission denied" too, and an INVALID_ARGUMENT, not an unreachable agent).
            return ControlError(f"{code.name}: {details}")
        if "permission denied" in lowered:
            return self._denied()
        if any(t in lowered for t in _TRANSPORT):
            hint = not_root_hint() if self.address is None else ""
            return ControlError(f"cannot reach the node agent at {self.where}: {details}{hint}")
        return ControlError(f"{code.name}: {details}")

    def call(
        self, method: Callable[..., Any], request: Any, timeout: float, *, flag: str | None = "--timeout"
    ) -> Any:
        """``method(request)``; ControlError with one line on failure (``flag``: the one that set
        ``timeout``, named when it runs out; None for a command that has none)."""
        import grpc

        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and exc.details() == "Deadline Exceeded":
                # This client's own deadline (the node agent's ack timeout says its own words).
                raise ControlError(
                    f"no answer from the node agent at {self.where} within {timeout:g} s"
                    f"{f' ({flag})' if flag else ''}: busy, or not a node agent; what was asked may "
                    "still be done there"
                ) from exc
            raise self.failure(exc) from exc


def call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One call of the control API's ``method`` at the node agent the command's flags name
    (``--control-socket``, or ``--grpc-address`` and its TLS), within ``--timeout``;
    ControlError with one line on failure (the command says it)."""
    target = ControlTarget.from_args(args)
    with target.stub() as stub:
        return target.call(getattr(stub, method), request, args.timeout)


def not_root_hint(hint: str = _NOT_ROOT_HINT) -> str:
    """What may be why the node agent turned this user away (``hint``), or the socket file
    kept it out (``_FILE_HINT``); "" for root."""
    return hint if os.geteuid() != 0 else ""


def _read_pem(flag: str, path: str | None) -> bytes | None:
    """The file a TLS flag names (None: not given), read as the node agent reads its own
    (``options._pem``): at most ``defaults.TLS_FILE_MAX`` (``/dev/zero`` was read until memory
    ran out), a FIFO without waiting for a writer (that waited past --timeout, for good);
    ControlError in one line otherwise."""
    if path is None:
        return None
    from zds.entryfile import read_tls_file

    try:
        return read_tls_file(flag, path)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
