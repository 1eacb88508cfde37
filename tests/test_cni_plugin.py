"""zds-cni speaks the CNI spec: run as a runtime runs it (a process, CNI_* in the environment,
the config on stdin) against a stand-in node agent that records what it is told."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import pathlib
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import NodeAgentProc
from tests.standins import Peers
from zds.cni.plugin import DEL_TIMEOUT
from zds.server.cni import parse_event

PREV_RESULT = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "82:a2:36:ae:32:b9", "sandbox": "/run/netns/netns-1"}],
    "ips": [{"version": "4", "interface": 0, "address": "10.213.0.2/24", "gateway": "10.213.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
CID = "6b6fc439b315ce7fc7a6e89832f2b8b5660dda4a1da35bce363dd47e596db8be"


class StandInAgent:
    """An HTTP server on a unix socket answering each path with a fixed (status, text)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.answers: dict[str, tuple[int, str]] = {}
        #: Seconds to wait before answering a path (a node agent still at work).
        self.delays: dict[str, float] = {}
        #: How many requests of a path are answered "too busy" first (the node agent's 503 with
        #: Retry-After, its requests in flight at their bound).
        self.busy: dict[str, int] = {}
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                agent.requests.append((self.path, json.loads(body)))
                if agent.busy.get(self.path, 0) > 0:
                    agent.busy[self.path] -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "1")
                    self.end_headers()
                    self.wfile.write(b"too many requests in flight; try again\n")
                    return
                time.sleep(agent.delays.get(self.path, 0.0))  # slow on purpose, not synchronisation
                status, text = agent.answers.get(self.path, (200, ""))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(text.encode())

            def do_GET(self) -> None:  # (STATUS: a path the node agent does not serve)
                agent.requests.append((f"GET {self.path}", {}))
                status, text = agent.answers.get(f"GET {self.path}", (404, "Not Found"))
                self.send_response(status)
                if agent.busy.get(self.path, 0) > 0:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop answering (the socket goes away); closing twice is harmless."""
        if os.path.exists(self.path):
            self.server.shutdown()
            self.server.server_close()
            os.unlink(self.path)


@pytest.fixture
def agent(tmp_path: pathlib.Path) -> Iterator[StandInAgent]:
    stand_in = StandInAgent(str(tmp_path / "agent.sock"))
    yield stand_in
    stand_in.close()


def config(tmp_path: pathlib.Path, version: str = "0.4.0", **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": "mesh",
        "type": "zds-cni",
        "cni_socket": str(tmp_path / "agent.sock"),
        "log_file": str(tmp_path / "zds-cni.log"),
        **extra,
    }


def plugin(command: str, conf: dict[str, Any] | bytes, **env: str) -> tuple[int, Any, str]:
    """Run zds-cni: (exit code, stdout as JSON or None, stderr)."""
    environment = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": CID,
        "CNI_NETNS": "/run/netns/netns-1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web",
        "CNI_PATH": "/usr/lib/cni",
        **env,
    }
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    done = subprocess.run(
        [sys.executable, "-m", "zds.cni.plugin"],
        input=stdin,
        capture_output=True,
        env=environment,
        timeout=60,
    )
    out = done.stdout.decode()
    return done.returncode, json.loads(out) if out.strip() else None, done.stderr.decode()


def test_version_lists_what_it_speaks() -> None:
    code, out, _ = plugin("VERSION", {"cniVersion": "1.0.0"}, CNI_CONTAINERID="", CNI_NETNS="")
    assert code == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_add_posts_istios_event_with_the_container_id_and_passes_prev_result_through(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    agent.answers["/cmdadd"] = (200, "enrolled: container web is labelled istio.io/dataplane-mode=ambient")
    code, out, err = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT))
    assert (code, err) == (0, "")
    assert out == PREV_RESULT  # unchanged
    [(path, body)] = agent.requests
    assert path == "/cmdadd"
    assert body == {
        "Netns": "/run/netns/netns-1",
        "PodName": "web",
        "PodNamespace": "default",
        "IPs": [
            {"Interface": 0, "Address": {"IP": "10.213.0.2", "Mask": "////AA=="}, "Gateway": "10.213.0.1"}
        ],
        "PodUID": CID,
        "ContainerID": CID,
    }
    assert base64.b64decode(body["IPs"][0]["Address"]["Mask"]) == bytes([255, 255, 255, 0])
    # The node agent reads it as Istio's body plus zds's extras.
    spec, container = parse_event(json.dumps(body).encode())
    assert (spec.uid, container, spec.ips) == (CID, CID, ("10.213.0.2",))
    assert "enrolled: container web" in (tmp_path / "zds-cni.log").read_text()


def test_add_without_prev_result_prints_an_empty_result_of_the_configs_version(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    code, out, _ = plugin("ADD", config(tmp_path, version="1.0.0"))
    assert (code, out) == (0, {"cniVersion": "1.0.0", "dns": {}})
    assert agent.requests[0][1]["IPs"] is None  # as Istio's plugin sends it


def test_enroll_all_leaves_the_decision_to_the_network(tmp_path: pathlib.Path, agent: StandInAgent) -> None:
    code, _, _ = plugin(
        "ADD", config(tmp_path, enroll="all"), CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"
    )
    assert code == 0
    body = agent.requests[0][1]
    assert "ContainerID" not in body and (body["PodNamespace"], body["PodUID"]) == ("shop", CID)


def test_a_containers_name_is_sent_as_the_engine_names_its_pod_and_a_kubernetes_pods_as_it_is(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """Podman gives a container's name as K8S_POD_NAME (and no namespace): ``My_App``, or
    podman-compose's ``proj_web_1``, is no DNS-1123 name, and with ``enroll: all`` the node
    agent refused every such container (it never started)."""
    for args, sent in [
        ("IgnoreUnknown=1;K8S_POD_NAME=My_App", "my-app"),
        ("K8S_POD_NAME=proj_web_1", "proj-web-1"),
        ("K8S_POD_NAME=web.v2", "web.v2"),
        ("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=My_App", "My_App"),  # (Kubernetes': refused as it is)
    ]:
        agent.requests.clear()
        assert plugin("ADD", config(tmp_path, enroll="all"), CNI_ARGS=args)[0] == 0
        assert agent.requests[0][1]["PodName"] == sent, args


@pytest.mark.parametrize(
    ("status", "code"), [(500, 100), (503, 101), (400, 100)], ids=["enrollment", "undecided", "bad"]
)
def test_a_failed_enrollment_fails_the_add_with_the_agents_words(
    tmp_path: pathlib.Path, agent: StandInAgent, status: int, code: int
) -> None:
    agent.answers["/cmdadd"] = (status, "no ztunnel connection")
    exit_code, out, _ = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT))
    assert exit_code == 1
    assert out["cniVersion"] == "0.4.0" and out["code"] == code
    assert out["msg"].endswith("no ztunnel connection")


def test_an_add_the_agent_did_not_answer_in_time_is_followed_by_a_del(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """The node agent took the ADD but had not answered within the timeout (it may enroll the
    pod yet): the runtime is told it failed, so the node agent is told the container is gone."""
    agent.delays["/cmdadd"] = 3.0
    code, out, _ = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT, timeout=1))
    assert code == 1 and out["code"] == 11 and "no answer from the node agent" in out["msg"]
    assert [path for path, _ in agent.requests] == ["/cmdadd", "/cmddel"]
    assert agent.requests[1][1] == {"PodUID": CID, "Netns": "/run/netns/netns-1"}


def test_the_del_after_an_unanswered_add_waits_briefly(tmp_path: pathlib.Path, agent: StandInAgent) -> None:
    """A node agent that hung answers neither: the ADD waited its timeout, the DEL after it
    waits only CLEANUP_TIMEOUT (it waited the timeout again: a runtime waited twice as long)."""
    agent.delays["/cmdadd"] = agent.delays["/cmddel"] = 5.0
    code, out, _ = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT, timeout=3))
    assert code == 1 and out["code"] == 11 and out["msg"].endswith("within 3s")
    assert [path for path, _ in agent.requests] == ["/cmdadd", "/cmddel"]
    logged = (tmp_path / "zds-cni.log").read_text()
    assert (
        f"the DEL after it failed too: zds-cni: no answer from the node agent on {agent.path} within 2s"
        in logged
    )


def test_a_node_agent_too_busy_is_asked_again_until_the_timeout(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """Its 503 with Retry-After (64 requests in flight) was taken for "cannot tell whether the
    container joins" (101): a burst of containers failed, and a DEL was dropped."""
    agent.busy["/cmdadd"] = agent.busy["/cmddel"] = 3
    code, out, _ = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT))
    assert (code, out) == (0, PREV_RESULT)
    assert (code := plugin("DEL", config(tmp_path))[0]) == 0
    assert [path for path, _ in agent.requests] == ["/cmdadd"] * 4 + ["/cmddel"] * 4
    agent.busy["/cmdadd"] = 1000  # busy for good: the runtime is told to try again later
    code, out, _ = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT, timeout=1))
    assert code == 1 and out["code"] == 11
    assert (
        out["msg"]
        == f"zds-cni: the node agent on {agent.path} was too busy for 1s: too many requests in flight; try again"
    )


def test_a_503_without_retry_after_is_the_node_agents_answer_not_asked_again(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    agent.answers["/cmdadd"] = agent.answers["/cmdcheck"] = (503, "cannot tell whether container x joins")
    code, out, _ = plugin("ADD", config(tmp_path, prevResult=PREV_RESULT))
    assert code == 1 and out["code"] == 101 and out["msg"].endswith("cannot tell whether container x joins")
    code, out, _ = plugin("CHECK", config(tmp_path, prevResult=PREV_RESULT))
    assert code == 1 and out["code"] == 101  # (as the ADD's; it was 100)
    assert [path for path, _ in agent.requests] == ["/cmdadd", "/cmdcheck"]


@pytest.mark.parametrize("how", ["trickled", "cut short"])
def test_an_answer_trickled_or_cut_short_fails_the_add_within_its_timeout(
    tmp_path: pathlib.Path, how: str
) -> None:
    """The timeout was each read's: an answer trickled a byte at a time held the runtime for
    as long as it went on (Istio's plugin: one deadline for the whole exchange), and one cut
    off in its headers was an empty 200, the pod "enrolled"."""
    path = str(tmp_path / "odd.sock")
    stop = threading.Event()

    def answer(listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    if how == "cut short":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Zds: a")
                        continue
                    for byte in b"HTTP/1.1 200 OK\r\nX-Zds: " + b"a" * 300:
                        if stop.wait(0.1):
                            break
                        conn.sendall(bytes([byte]))

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        thread = threading.Thread(target=answer, args=(listener,), daemon=True)
        thread.start()
        try:
            started = time.monotonic()
            code, out, _ = plugin("ADD", config(tmp_path, cni_socket=path, timeout=1, prevResult=PREV_RESULT))
            took = time.monotonic() - started
        finally:
            stop.set()
            listener.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    assert code == 1 and out["code"] == 11, out
    if how == "cut short":
        assert out["msg"] == f"zds-cni: the node agent's answer on {path} was cut short (0 bytes)"
    else:
        assert out["msg"] == f"zds-cni: no answer from the node agent on {path} within 1s"
        assert took < 15, took  # (the trickle: 30 s; the ADD's 1 s and the DEL's after it)


def test_a_del_waits_for_a_node_agent_that_hung_at_most_del_timeout(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """It waited the ADD's timeout (20 s by default, up to an hour) for an answer that changes
    nothing: every container's teardown held that long."""
    agent.delays["/cmddel"] = DEL_TIMEOUT + 3
    code, out, _ = plugin("DEL", config(tmp_path, timeout=60))
    assert (code, out) == (0, None)
    logged = (tmp_path / "zds-cni.log").read_text()
    assert f"no answer from the node agent on {agent.path} within {DEL_TIMEOUT:g}s" in logged


def test_an_error_found_before_the_config_is_read_carries_the_configs_version() -> None:
    """A 0.3.1 network's missing CNI_NETNS was answered as 1.1.0 (the environment is checked
    first); the spec has an error carry the config's version."""
    conf = {"cniVersion": "0.3.1", "name": "n", "type": "zds-cni"}
    code, out, _ = plugin("ADD", conf, CNI_NETNS="")
    assert code == 1 and out["code"] == 4 and out["cniVersion"] == "0.3.1"
    code, out, _ = plugin("ADD", b"{not json", CNI_NETNS="")
    assert code == 1 and out["cniVersion"] == "1.1.0"  # (none to be read: the newest)


def test_an_unreachable_agent_fails_the_add_try_again_later(tmp_path: pathlib.Path) -> None:
    code, out, _ = plugin("ADD", config(tmp_path))
    assert code == 1 and out["code"] == 11
    assert "cannot reach the node agent" in out["msg"] and "No such file" in out["msg"]
    assert set(out) == {"cniVersion", "code", "msg", "details"}


def test_del_tells_the_agent_and_succeeds_even_when_it_is_gone(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    code, out, _ = plugin("DEL", config(tmp_path, prevResult=PREV_RESULT))
    assert (code, out) == (0, None)
    assert agent.requests == [("/cmddel", {"PodUID": CID, "Netns": "/run/netns/netns-1"})]
    agent.close()
    code, out, _ = plugin("DEL", config(tmp_path), CNI_NETNS="")
    assert (code, out) == (0, None)
    assert (
        "the node agent finds the pod gone by itself; else it stays until zds pod remove"
        in (tmp_path / "zds-cni.log").read_text()
    )


def test_istios_keys_exclude_namespaces_and_ambient_enabled_keep_the_node_agent_untold(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """As Istio's plugin (doAddRun): a pod in an excluded namespace, or any pod with
    ambient_enabled false, is not told to the node agent; its ADD passes prevResult on."""
    excluded = config(tmp_path, prevResult=PREV_RESULT, exclude_namespaces=["kube-system", "default"])
    in_it = {"CNI_ARGS": "K8S_POD_NAME=dns;K8S_POD_NAMESPACE=kube-system"}
    assert plugin("ADD", excluded, **in_it)[:2] == (0, PREV_RESULT)
    assert plugin("CHECK", excluded, **in_it)[:2] == (0, None)
    off = config(tmp_path, prevResult=PREV_RESULT, ambient_enabled=False)
    assert plugin("ADD", off)[:2] == (0, PREV_RESULT)
    assert agent.requests == []
    assert "pod namespace kube-system excluded" in (tmp_path / "zds-cni.log").read_text()
    # Another namespace, a container that is no Kubernetes pod (Istio's plugin looks only at
    # a pod with both a name and a namespace), ambient_enabled true, or null as Istio's
    # installer writes an empty list (Go's zero value: absent, on), is told as before.
    assert plugin("ADD", excluded, CNI_ARGS="K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop")[0] == 0
    assert plugin("ADD", excluded, CNI_ARGS="K8S_POD_NAMESPACE=default")[0] == 0
    assert plugin("ADD", config(tmp_path, ambient_enabled=True))[0] == 0
    nulls = config(tmp_path, exclude_namespaces=None, ambient_enabled=None, cni_agent_run_dir=None)
    assert plugin("ADD", nulls)[0] == 0
    assert [path for path, _ in agent.requests] == ["/cmdadd"] * 4
    for bad, says in ((["a", 1], "exclude_namespaces"), ("kube-system", "exclude_namespaces")):
        code, out, _ = plugin("ADD", config(tmp_path, exclude_namespaces=bad))
        assert code == 1 and out["code"] == 7 and says in out["msg"], out
    code, out, _ = plugin("ADD", config(tmp_path, ambient_enabled="yes"))
    assert code == 1 and out["code"] == 7 and "ambient_enabled" in out["msg"], out


def test_istios_cni_agent_run_dir_names_the_socket_when_cni_socket_does_not(tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "istio-cni"
    run_dir.mkdir()
    there = StandInAgent(str(run_dir / "pluginevent.sock"))
    try:
        conf = {**config(tmp_path, cni_agent_run_dir=str(run_dir)), "log_level": "warn"}
        del conf["cni_socket"]
        assert plugin("ADD", conf)[0] == 0
        assert [path for path, _ in there.requests] == ["/cmdadd"]
    finally:
        there.close()


def test_a_del_whose_config_has_an_error_in_zds_cnis_keys_succeeds_and_tells_nobody(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """Istio's DEL reads no config: a container's teardown must not wait on a key only ADD
    needs. What libcni's skel refuses for a DEL too (a version it does not speak, a config
    that is not JSON) is still refused."""
    unversioned = config(tmp_path)
    del unversioned["cniVersion"]
    for conf in (config(tmp_path, log_level="verbose"), config(tmp_path, timeout=0), unversioned):
        code, out, err = plugin("DEL", conf)
        assert (code, out) == (0, None), (conf, out)
        assert "the node agent is not told" in err and err.count("\n") == 1, err
    assert agent.requests == []
    assert plugin("DEL", config(tmp_path), CNI_ARGS="garbage")[:2] == (0, None)  # (told, as any DEL)
    assert agent.requests == [("/cmddel", {"PodUID": CID, "Netns": "/run/netns/netns-1"})]
    code, out, _ = plugin("ADD", config(tmp_path), CNI_ARGS="garbage")
    assert code == 1 and out["code"] == 4, out
    code, out, _ = plugin("DEL", config(tmp_path, version="9.9.9"))
    assert code == 1 and out["code"] == 1, out
    code, out, _ = plugin("DEL", b"{not json")
    assert code == 1 and out["code"] == 6, out
    code, out, _ = plugin("ADD", config(tmp_path, timeout=0))
    assert code == 1 and out["code"] == 7, out


@pytest.mark.parametrize("number", ["NaN", "-Infinity", "1e999"])
def test_numbers_json_has_not_are_refused_not_printed_back(
    tmp_path: pathlib.Path, agent: StandInAgent, number: str
) -> None:
    """Python's json takes NaN, Infinity and 1e999 (as infinity), and wrote them back in the
    result as ``Infinity``: no JSON a runtime can read. Refused as any undecodable config."""
    conf = json.dumps(config(tmp_path, prevResult={"cniVersion": "0.4.0", "x": 1}))
    code, out, _ = plugin("ADD", conf.replace('"x": 1', f'"x": {number}').encode())
    assert code == 1 and out["code"] == 6 and number in out["msg"], out
    assert agent.requests == []


def test_check_asks_the_agent(tmp_path: pathlib.Path, agent: StandInAgent) -> None:
    assert plugin("CHECK", config(tmp_path, prevResult=PREV_RESULT))[:2] == (0, None)
    agent.answers["/cmdcheck"] = (500, "pod 6b6fc439b315 is not enrolled")
    code, out, _ = plugin("CHECK", config(tmp_path, prevResult=PREV_RESULT))
    assert code == 1 and out["code"] == 100 and "is not enrolled" in out["msg"]


PREV_RESULT_0_3 = {
    "cniVersion": "0.3.1",
    "interfaces": [{"name": "eth0", "mac": "82:a2:36:ae:32:b9", "sandbox": "/run/netns/netns-1"}],
    # 0.3.x results name each address's IP version (1.0.0 dropped the field).
    "ips": [{"version": "4", "interface": 0, "address": "10.213.0.2/24", "gateway": "10.213.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_a_0_3_config_adds_with_a_0_3_result_and_refuses_check(
    tmp_path: pathlib.Path, agent: StandInAgent, version: str
) -> None:
    prev = {**PREV_RESULT_0_3, "cniVersion": version}
    code, out, err = plugin("ADD", config(tmp_path, version=version, prevResult=prev))
    assert (code, err) == (0, "")
    assert out == prev  # the 0.3.x result as the runtime gave it: "version" in each ip, its cniVersion
    assert plugin("ADD", config(tmp_path, version=version))[:2] == (0, {"cniVersion": version, "dns": {}})
    assert [path for path, _ in agent.requests] == ["/cmdadd", "/cmdadd"]
    # CHECK came with spec 0.4.0: refused as libcni's skel refuses it, the node agent never asked.
    code, out, _ = plugin("CHECK", config(tmp_path, version=version, prevResult=prev))
    assert code == 1
    assert out == {
        "cniVersion": "1.1.0",  # the plugin's, as for every refusal of the config's version
        "code": 1,
        "msg": "config version does not allow CHECK",
        "details": f"CHECK needs cniVersion 0.4.0 or later; the config is {version}",
    }
    assert [path for path, _ in agent.requests] == ["/cmdadd", "/cmdadd"]


def test_status_and_gc_only_for_1_1_configs(tmp_path: pathlib.Path, agent: StandInAgent) -> None:
    assert plugin("STATUS", config(tmp_path, version="1.1.0"))[:2] == (0, None)
    assert plugin("GC", config(tmp_path, version="1.1.0"))[:2] == (0, None)
    code, out, _ = plugin("STATUS", config(tmp_path, version="1.0.0"))
    assert code == 1 and out["code"] == 1 and out["msg"] == "config version does not allow STATUS"
    code, out, _ = plugin("STATUS", config(tmp_path, version="1.1.0", cni_socket=str(tmp_path / "none.sock")))
    assert code == 1 and out["code"] == 50
    # (an HTTP request, answered: a 404 is a node agent without it, Istio's)
    assert [path for path, _ in agent.requests] == ["GET /cmdstatus?enroll=labelled"]


def test_status_fails_for_a_node_agent_that_takes_the_connection_and_never_answers(
    tmp_path: pathlib.Path,
) -> None:
    """The kernel takes connections into a listening socket's backlog whatever its process
    does: a connect alone said ready for a node agent that had hung."""
    path = str(tmp_path / "hung.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(path)
        hung.listen(8)
        code, out, _ = plugin("STATUS", config(tmp_path, version="1.1.0", cni_socket=path, timeout=1))
    assert code == 1 and out["code"] == 50
    assert out["msg"] == f"zds-cni: no answer from the node agent on {path} within 1s"


def test_status_is_ready_while_the_node_agent_is_busy_and_not_on_its_other_errors(
    tmp_path: pathlib.Path, agent: StandInAgent
) -> None:
    """Busy (a 503 with Retry-After) is serving: an ADD asks again. A runtime that takes a
    failed STATUS for a network not ready (containerd) would stop starting the pods that
    made it busy."""
    path = "/cmdstatus?enroll=labelled"
    agent.answers[f"GET {path}"] = (503, "too many requests in flight; try again")
    agent.busy[path] = 1
    assert plugin("STATUS", config(tmp_path, version="1.1.0"))[:2] == (0, None)
    agent.busy[path] = 0
    agent.answers[f"GET {path}"] = (503, "node agent not ready: ZDS listener is down")
    code, out, _ = plugin("STATUS", config(tmp_path, version="1.1.0"))
    assert code == 1 and out["code"] == 50
    assert out["msg"].endswith("is not ready: node agent not ready: ZDS listener is down")
    # (no ADD asks the node agent anything: neither does STATUS)
    assert plugin("STATUS", config(tmp_path, version="1.1.0", ambient_enabled=False))[:2] == (0, None)
    agent.answers[f"GET {path}"] = (500, "")
    code, out, _ = plugin("STATUS", config(tmp_path, version="1.1.0"))
    assert code == 1 and out["code"] == 50 and out["msg"].endswith("is not ready: HTTP 500")


def test_status_against_the_node_agent_itself_and_the_same_one_stopped(
    tmp_path: pathlib.Path, server: NodeAgentProc, peers: Peers
) -> None:
    """Not ready while every ADD would fail: it said ready for labelled pods with no container
    engine to decide them. Ready with no ztunnel connected: a runtime that reads a failed
    STATUS as its network not ready starts no pod off the host's network, ztunnel's own
    included (each ADD of a pod that joins fails meanwhile, as with Istio's node agent)."""
    conf = config(tmp_path, version="1.1.0", cni_socket=server.cni_socket, timeout=1, enroll="all")
    assert plugin("STATUS", conf)[:2] == (0, None)
    peers.acking(server.zds_socket).wait_snapshot()
    assert plugin("STATUS", conf)[:2] == (0, None)
    code, out, _ = plugin("STATUS", {**conf, "enroll": "labelled"})
    assert (
        code == 1 and out["code"] == 50 and "no container engine to read the containers' labels" in out["msg"]
    )
    os.kill(server.proc.pid, signal.SIGSTOP)  # hung: its socket still takes connections
    try:
        code, out, _ = plugin("STATUS", conf)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert code == 1 and out["code"] == 50 and "no answer from the node agent on" in out["msg"]
    assert plugin("STATUS", conf)[:2] == (0, None)


@pytest.mark.parametrize(
    ("command", "conf", "env", "code", "text"),
    [
        ("ADD", {"cniVersion": "0.2.0", "name": "n", "type": "zds-cni"}, {}, 1, "0.2.0 is not supported"),
        ("ADD", {"name": "n", "type": "zds-cni"}, {}, 7, "no cniVersion"),
        ("ADD", {"cniVersion": "1.0.0", "type": "zds-cni"}, {}, 7, "no name"),
        ("ADD", b"{not json", {}, 6, "not JSON"),
        ("ADD", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 6, "not JSON"),
        ("ADD", b'{"cniVersion": "1.0.0", "n": ' + b"1" * 5000 + b"}", {}, 6, "not JSON"),
        ("ADD", {"cniVersion": "1.0.0", "name": "n", "type": "t"}, {"CNI_NETNS": ""}, 4, "CNI_NETNS not set"),
        (
            "ADD",
            {"cniVersion": "1.0.0", "name": "n", "type": "t"},
            {"CNI_CONTAINERID": "a/b"},
            4,
            "container id",
        ),
        (  # (libcni's check, in Go: its $ matches at the very end only)
            "ADD",
            {"cniVersion": "1.0.0", "name": "n", "type": "t"},
            {"CNI_CONTAINERID": "abc\n"},
            4,
            "container id",
        ),
        ("ADD", {"cniVersion": "1.0.0", "name": "n", "type": "t", "timeout": -1}, {}, 7, "timeout"),
        ("ADD", b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "timeout": NaN}', {}, 6, "not JSON"),
        ("ADD", b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "timeout": 1e999}', {}, 6, "not JSON"),
        ("ADD", {"cniVersion": "1.0.0", "name": "n", "type": "t", "timeout": 1e300}, {}, 7, "timeout"),
        ("FROB", {"cniVersion": "1.0.0", "name": "n", "type": "t"}, {}, 4, "unknown CNI_COMMAND"),
    ],
)
def test_what_the_spec_refuses_is_an_error_object_on_stdout(
    command: str, conf: Any, env: dict[str, str], code: int, text: str
) -> None:
    exit_code, out, _ = plugin(command, conf, **env)
    assert exit_code == 1 and out["code"] == code and text in out["msg"], out
