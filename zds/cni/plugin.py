"""``zds-cni``: zds's CNI plugin, chained after a network's own plugins.

A CNI runtime (Podman, containerd, CRI-O) runs it for every container on the
network: the command in ``CNI_COMMAND``, the network configuration on stdin.
Nothing but the result (or the spec's error object) goes to stdout; the plugin
logs to its own file (``log_file``, default ``/var/log/zds-cni.log``).

- ADD: posts Istio's plugin event (``Netns``, ``PodName``, ``PodNamespace``,
  ``IPs``) plus ``PodUID`` (the container id) and ``ContainerID`` to the node
  agent's ``/cmdadd`` on its CNI socket, and waits: the node agent decides from
  the container's labels (through its container engine) whether the pod joins
  the mesh, and enrolls it. A selected pod whose enrollment fails fails the
  ADD, so no pod starts unredirected (Istio's rule). A node agent that cannot
  be reached fails the ADD too, as Istio's plugin fails it (zds-cni says code
  11, try again later; Istio's error reaches the runtime as code 999). Then
  prints ``prevResult`` unchanged.
- DEL: tells the node agent the pod is gone (``/cmddel``); succeeds even when
  the agent cannot be reached (the spec: DEL must not fail on what is already
  gone; the agent's engine watch and its restart recovery find the pod gone).
- CHECK: asks the node agent (``/cmdcheck``) whether a selected pod is enrolled
  in this netns with its rules.
- STATUS (1.1.0 configs): fails (code 50) while the node agent does not answer
  ``GET /cmdstatus`` on its socket within 5 s, or answers that every ADD would fail now (not
  ready, no container engine for labelled pods), or another error
  than its "too busy" (a 404 is a node agent without it: Istio's). GC: nothing to collect
  (the node agent watches its pods).
- VERSION: the versions it speaks.

Config keys besides the spec's: ``cni_socket`` (the node agent's, default
``/var/run/istio-cni/pluginevent.sock``), ``log_file``, ``log_level``,
``timeout`` (seconds, default 20), ``enroll``: ``labelled`` (default; the
labels decide) or ``all`` (every pod on this network joins: for runtimes
without a Docker-compatible API to read labels from). Istio's plugin's keys as it
reads them: ``exclude_namespaces`` (ADD and CHECK of a Kubernetes pod in one of them tell the
node agent nothing), ``ambient_enabled`` (``false``: the same for every pod; absent:
on, zds-cni's purpose), ``cni_agent_run_dir`` (the socket is its
``pluginevent.sock`` when ``cni_socket`` is not given).

A DEL whose config has an error in these keys, or no cniVersion, succeeds and tells the
node agent nothing (Istio's DEL reads no config: a container's teardown waits on it).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from zds import defaults, logs
from zds.cni import spec
from zds.cni.spec import CniError, Code, Invocation
from zds.server import names

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger("zds.cni")

ENROLL_MODES = ("labelled", "all")
#: The node agent's socket in Istio's ``cni_agent_run_dir`` (its ``constants.CNIEventSocketName``).
CNI_SOCKET_NAME = "pluginevent.sock"
#: How long the DEL that follows an ADD the node agent did not answer in time waits (seconds).
CLEANUP_TIMEOUT = 2.0
#: How long a DEL waits for the node agent at most (seconds): its answer changes nothing (the
#: DEL succeeds whatever it is; a removal under way goes on), and a node agent that hung held
#: each container's teardown for the ADD's whole timeout.
DEL_TIMEOUT = 5.0
#: How long STATUS waits for the node agent's answer at most (seconds; the config's timeout
#: when shorter).
STATUS_TIMEOUT = 5.0
#: A node agent too busy (a 503 with Retry-After: its requests in flight at their bound) is
#: asked again after this pause, doubling up to BUSY_PAUSE_MAX, until the timeout.
BUSY_PAUSE = 0.05
BUSY_PAUSE_MAX = 1.0
#: A try while busy is made only with at least this long (or a quarter of the timeout) left.
BUSY_LAST_TRY = 0.5
#: The longest ``timeout`` a config may give (seconds): a runtime waits that long for an ADD.
MAX_TIMEOUT = 3600
#: The most of a node agent's answer read (its answers are a line; as Istio's plugin, 1 MiB).
MAX_ANSWER = 1024 * 1024


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the node agent's unix socket (as Istio's plugin dials it), the whole exchange
    within ``timeout`` seconds (as Go's ``http.Client.Timeout``, Istio's plugin's)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path
        self.exchange_timeout = timeout

    def connect(self) -> None:
        sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.deadline = time.monotonic() + self.exchange_timeout
        sock.settimeout(self.exchange_timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _DeadlineSocket(socket.socket):
    """A socket whose every wait counts against one ``deadline`` (``time.monotonic``): a
    timeout alone is per call, and a node agent that trickled its answer a byte at a time
    held the runtime for as long as it went on."""

    deadline = float("inf")

    def _left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.settimeout(left)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        self._left()
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        self._left()
        super().sendall(data, flags)


class AgentUnreachable(CniError):
    """The node agent's CNI socket did not answer."""


class PluginConfig:
    """zds-cni's own keys of the network configuration, checked once."""

    def __init__(self, doc: dict[str, Any]) -> None:
        # (Istio's keys: null, as its installer writes an empty list, or "" is Go's zero value)
        run_dir = doc.get("cni_agent_run_dir") or ""
        if not isinstance(run_dir, str):
            raise CniError(Code.INVALID_CONFIG, "cni_agent_run_dir must be a string")
        default_socket = os.path.join(run_dir, CNI_SOCKET_NAME) if run_dir else defaults.CNI_SOCKET
        self.cni_socket = _string(doc, "cni_socket", default_socket)
        self.log_file = _string(doc, "log_file", defaults.CNI_PLUGIN_LOG)
        level = _string(doc, "log_level", "info").lower()
        self.log_level = "warning" if level == "warn" else level  # (Istio's name for it)
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise CniError(
                Code.INVALID_CONFIG, f"log_level {level!r}: expected debug, info, warn(ing) or error"
            )
        excluded = doc.get("exclude_namespaces") or []
        if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
            raise CniError(Code.INVALID_CONFIG, "exclude_namespaces must be a list of strings")
        #: Namespaces whose pods zds-cni tells the node agent nothing of (Istio's key).
        self.exclude_namespaces = frozenset(excluded)
        ambient = doc.get("ambient_enabled")
        ambient = True if ambient is None else ambient
        if not isinstance(ambient, bool):
            raise CniError(Code.INVALID_CONFIG, "ambient_enabled must be true or false")
        #: Istio's key: false, no pod is told to the node agent (absent: on).
        self.ambient_enabled = ambient
        self.enroll = _string(doc, "enroll", "labelled")
        if self.enroll not in ENROLL_MODES:
            raise CniError(Code.INVALID_CONFIG, f"enroll {self.enroll!r}: expected labelled or all")
        timeout = doc.get("timeout", defaults.CNI_PLUGIN_TIMEOUT)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_TIMEOUT  # (also NaN; 1e999 is inf)
        ):
            raise CniError(
                Code.INVALID_CONFIG,
                f"timeout {timeout!r}: expected a positive number of seconds, at most {MAX_TIMEOUT}",
            )
        self.timeout = float(timeout)


def _string(doc: dict[str, Any], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(Code.INVALID_CONFIG, f"{key} must be a non-empty string")
    return value


def _post(
    config: PluginConfig, path: str, body: dict[str, Any], timeout: float | None = None
) -> tuple[int, str]:
    """POST ``body`` to the node agent; (status, text). Asked again while it says it is too
    busy; AgentUnreachable if it does not answer, or is still busy, within ``timeout``
    seconds (the config's by default)."""
    timeout = config.timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    pause = BUSY_PAUSE
    data = json.dumps(body)
    while True:
        left = deadline - time.monotonic()
        status, text, busy = _request(config, "POST", path, data, timeout, left, Code.TRY_AGAIN_LATER)
        if not busy:
            return status, text
        # (a last try with hardly any time left would be taken, then cut off as unanswered)
        if deadline - time.monotonic() - pause < min(BUSY_LAST_TRY, timeout / 4):
            raise AgentUnreachable(
                Code.TRY_AGAIN_LATER,
                f"zds-cni: the node agent on {config.cni_socket} was too busy for {timeout:g}s: {text}",
            )
        time.sleep(pause)
        pause = min(2 * pause, BUSY_PAUSE_MAX)


def _request(
    config: PluginConfig, method: str, path: str, body: str | None, timeout: float, left: float, code: Code
) -> tuple[int, str, bool]:
    """One request, the whole exchange within ``left`` seconds (of ``timeout``): (status, text, whether
    it was the node agent's "too busy": a 503 with Retry-After); AgentUnreachable (``code``)
    if it does not answer."""
    conn = _UnixConnection(config.cni_socket, max(left, 0.001))
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read(MAX_ANSWER)
        if not _whole(response, answer):
            raise AgentUnreachable(
                code,
                f"zds-cni: the node agent's answer on {config.cni_socket} was cut short ({len(answer)} bytes)",
            )
        text = answer.decode(errors="replace").strip()
        return response.status, text, response.status == 503 and response.getheader("Retry-After") is not None
    except TimeoutError as exc:
        raise AgentUnreachable(
            code, f"zds-cni: no answer from the node agent on {config.cni_socket} within {timeout:g}s"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise AgentUnreachable(
            code,
            f"zds-cni: cannot reach the node agent on {config.cni_socket}: {exc}",
            "is `zds server` running with this --cni-socket?",
        ) from exc
    finally:
        conn.close()


def _whole(response: http.client.HTTPResponse, answer: bytes) -> bool:
    """Whether an answer came whole: all its Content-Length (or MAX_ANSWER of it), or chunked
    (a chunk cut short raises). An HTTP/1.1 one with neither ends where the connection did,
    as one cut off in its headers does (it read as an empty 200, "enrolled"): the node agents
    (aiohttp's, Go's net/http) always say its length. HTTP/1.0 answers end so."""
    if response.chunked or response.version == 10:
        return True
    return response.length is not None and (response.length == 0 or len(answer) == MAX_ANSWER)


def _event(inv: Invocation, config: PluginConfig, doc: dict[str, Any]) -> dict[str, Any]:
    """Istio's CNIPluginAddEvent, plus the uid zds needs (the container id: the container
    engine names the pod the same way) and, when the labels decide, the container to look up."""
    name = inv.args.get("K8S_POD_NAME") or inv.container_id
    if "K8S_POD_NAMESPACE" not in inv.args and names.subdomain_problem(name, "pod name"):
        # A container's name, not a Kubernetes pod's (Podman gives only K8S_POD_NAME): named
        # as the node agent's container engine names it (``My_App``: ``my-app``).
        name = names.dns_name(name, names.SUBDOMAIN_MAX)
    body: dict[str, Any] = {
        "Netns": inv.netns,
        "PodName": name,
        "PodNamespace": inv.args.get("K8S_POD_NAMESPACE") or defaults.POD_NAMESPACE,
        "IPs": spec.plugin_event_ips(doc.get("prevResult")),
        "PodUID": inv.container_id,
    }
    if config.enroll == "labelled":
        body["ContainerID"] = inv.container_id
    return body


def _skipped(inv: Invocation, config: PluginConfig) -> str:
    """Why the node agent is not told of this pod (Istio's keys), or ''."""
    if not config.ambient_enabled:
        return "ambient_enabled is false"
    # (as Istio's: a Kubernetes pod's, both given; a plain container is in no namespace yet)
    namespace = inv.args.get("K8S_POD_NAMESPACE", "")
    if inv.args.get("K8S_POD_NAME") and namespace in config.exclude_namespaces:
        return f"pod namespace {namespace} excluded"
    return ""


def cmd_add(inv: Invocation, config: PluginConfig, doc: dict[str, Any]) -> dict[str, Any]:
    if skipped := _skipped(inv, config):
        log.info("ADD %s: %s; the node agent is not told", inv.container_id[:12], skipped)
        return spec.add_result(doc)
    try:
        status, text = _post(config, defaults.CNI_ADD_EVENT_PATH, _event(inv, config, doc))
    except AgentUnreachable as exc:
        if isinstance(exc.__cause__, TimeoutError):
            # It took the request and may still enroll the pod, which the runtime is now told
            # failed: tell it the container is gone too (it serves the two in order), best effort
            # and briefly (a node agent that hung would make the ADD wait twice its timeout).
            body = {"PodUID": inv.container_id, "Netns": inv.netns}
            try:
                _post(config, defaults.CNI_DEL_EVENT_PATH, body, min(config.timeout, CLEANUP_TIMEOUT))
            except AgentUnreachable as gone:
                log.warning("ADD %s: the DEL after it failed too: %s", inv.container_id[:12], gone.msg)
        raise
    if status == 200:
        log.info("ADD %s: %s", inv.container_id[:12], text or "enrolled", extra={"netns": inv.netns})
        return spec.add_result(doc)
    raise CniError(
        _failure_code(status),
        f"zds-cni: the node agent did not enroll container {inv.container_id[:12]}: {text}",
    )


def _failure_code(status: int) -> Code:
    """The CNI error code of a node agent's answer other than 200 to an ADD or a CHECK: 503,
    it cannot tell whether the container joins (no engine, or the container not known)."""
    return Code.SELECTION_FAILED if status == 503 else Code.ENROLLMENT_FAILED


def cmd_del(inv: Invocation, config: PluginConfig, doc: dict[str, Any]) -> None:
    body = {"PodUID": inv.container_id, "Netns": inv.netns}
    try:
        status, text = _post(config, defaults.CNI_DEL_EVENT_PATH, body, min(config.timeout, DEL_TIMEOUT))
    except AgentUnreachable as exc:
        log.warning(
            "DEL %s: %s (with --container-engine the node agent finds the pod gone by itself; "
            "else it stays until zds pod remove or --netns-sweep)",
            inv.container_id[:12],
            exc,
        )
        return
    level = logging.INFO if status == 200 else logging.ERROR
    log.log(level, "DEL %s: %s %s", inv.container_id[:12], status, text or "removed")


def cmd_check(inv: Invocation, config: PluginConfig, doc: dict[str, Any]) -> None:
    if _skipped(inv, config):
        return
    status, text = _post(config, defaults.CNI_CHECK_EVENT_PATH, _event(inv, config, doc))
    if status != 200:
        raise CniError(_failure_code(status), f"zds-cni: CHECK of container {inv.container_id[:12]}: {text}")


def cmd_status(config: PluginConfig) -> None:
    """Ready unless the node agent says every ADD would fail now (``GET /cmdstatus?enroll=``
    the config's mode: it answers 503 with what they would meet: not ready, no container
    engine for labelled pods; not "no ztunnel": ztunnel's own pod would never start), the
    whole exchange within STATUS_TIMEOUT; with ``ambient_enabled: false`` always (no ADD asks). A node agent that does not serve it (a 404: Istio's, whose plugin has no
    STATUS) is ready once it answers: a connect alone said ready for one that had hung (the
    kernel takes connections into the socket's backlog whatever the process does). Its "too
    busy" (a 503 with Retry-After, its requests in flight at their bound) is ready: an ADD
    asks again, and a runtime that takes a failed STATUS for a network not ready would stop
    starting the very pods that made it busy."""
    if not config.ambient_enabled:
        return  # (no ADD asks the node agent anything)
    timeout = min(config.timeout, STATUS_TIMEOUT)
    path = f"{defaults.CNI_STATUS_PATH}?enroll={config.enroll}"
    status, text, busy = _request(config, "GET", path, None, timeout, timeout, Code.PLUGIN_NOT_AVAILABLE)
    if status >= 400 and status != 404 and not busy:
        raise CniError(
            Code.PLUGIN_NOT_AVAILABLE,
            f"zds-cni: the node agent on {config.cni_socket} is not ready: {text or f'HTTP {status}'}",
        )


def _configure_logging(config: PluginConfig) -> None:
    """Log to the plugin's own file (never stdout: that is the runtime's); stderr if it cannot be opened."""
    handler: logging.Handler
    try:
        os.makedirs(os.path.dirname(config.log_file) or ".", exist_ok=True)
        handler = logging.FileHandler(config.log_file)
    except OSError as exc:
        handler = logging.StreamHandler(sys.stderr)
        print(f"zds-cni: cannot open log file {config.log_file}: {exc}", file=sys.stderr)
    handler.setFormatter(logs.TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(config.log_level.upper())
    log.propagate = False


def run(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """One invocation: (exit code, what to print on stdout, if anything)."""
    version = ""  # (the config's, once it is read)
    try:
        inv = Invocation.from_environment(env)
        try:
            doc = spec.parse_config(stdin, inv.command)
            if inv.command == "VERSION":
                return 0, spec.version_info()
            version = doc["cniVersion"]
            config = PluginConfig(doc)
        except CniError as exc:
            if (
                inv.command != "DEL"
                or exc.code is Code.INCOMPATIBLE_VERSION
                or spec.json_object(stdin) is None
            ):
                raise
            # (libcni's skel refuses, for a DEL too, a version it does not speak and a config
            # that is not JSON; the rest is zds-cni's own checking)
            print(
                f"zds-cni: DEL {inv.container_id[:12]}: {exc.msg}; the node agent is not told",
                file=sys.stderr,
            )
            return 0, None
        _configure_logging(config)
        log.debug("%s container=%s netns=%s args=%s", inv.command, inv.container_id, inv.netns, inv.args)
        if inv.command == "ADD":
            return 0, cmd_add(inv, config, doc)
        if inv.command == "DEL":
            cmd_del(inv, config, doc)
        elif inv.command == "CHECK":
            cmd_check(inv, config, doc)
        elif inv.command == "STATUS":
            cmd_status(config)
        return 0, None
    except CniError as exc:
        log.error("%s", exc.msg)
        # (a refusal of the config's version is in the plugin's own, as libcni's skel's; an
        # error before the config is read carries its version, when it has one)
        if exc.code is Code.INCOMPATIBLE_VERSION:
            return 1, exc.document(spec.CURRENT_VERSION)
        return 1, exc.document(version or spec.config_version(stdin))
    except Exception as exc:  # the runtime must get the spec's error object, whatever happened
        log.exception("internal error")
        error = CniError(Code.INTERNAL, f"zds-cni: internal error: {exc!r}")
        return 1, error.document(version or spec.config_version(stdin))


def main(stdout: IO[str] | None = None) -> int:
    code, output = run(dict(os.environ), sys.stdin.buffer.read() if not sys.stdin.closed else b"")
    if output is not None:
        out = stdout or sys.stdout
        out.write(json.dumps(output) + "\n")
        out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
