"""The Dockerfile and docker-compose.yml: linted, validated, and run for real with Podman.

The quick checks lint the Dockerfile (hadolint), validate the compose file
(``docker-compose config -q``) and pin where privilege lives. The scenario test
builds the images on a base image made without a registry, starts its own
``podman system service`` (the engine API the node agent watches) and points
Podman at a temporary CNI conf dir (the compose network's conflist goes there,
not into the machine's /etc/cni/net.d), brings the compose file up with
podman-compose, waits for the one-shot ``check`` service to exit 0 (the
labelled application containers joined the mesh by themselves and their
traffic went through both ztunnel listeners), shows every service's logs when
it does not, and tears down everything it made, also on failure.
tests/compose/setup.sh installs and caches what this needs.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.harness import ROOT, is_root, wait_until
from zds.server.names import dns_name

SETUP = ROOT / "tests" / "compose" / "setup.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: Images built by the scenario test carry this tag (the compose file's ZDS_TAG).
TAG = "ci"
#: Every service's own capabilities: privilege lives in the node agent and ztunnel; the
#: applications and the check get none.
CAPABILITIES: dict[str, set[str]] = {
    "node-agent": {"SYS_ADMIN", "NET_ADMIN"},
    "ztunnel": {"SYS_ADMIN", "NET_ADMIN"},
    "reviews": set(),
    "productpage": set(),
    "check": set(),
}
APPS = ("productpage", "reviews")
#: The images' HEALTHCHECK endpoints (the Dockerfile's), read again when a check fails.
HEALTH_URLS = {
    "node-agent": "http://127.0.0.1:8000/readyz",
    "ztunnel": "http://127.0.0.1:15021/healthz/ready",
}
ENGINE_NETNS = "${ZDS_ENGINE_NETNS_DIR:-/run/netns}:${ZDS_ENGINE_NETNS_DIR:-/run/netns}:ro,rslave"


def missing_tool(what: str) -> None:
    """Skip on a developer machine; fail in CI, where everything must run."""
    if os.environ.get("CI", "").lower() == "true" or is_root():
        pytest.fail(f"{what} is not available, and setup.sh could not install it")
    pytest.skip(f"{what} is not available (run tests/compose/setup.sh tools, as root for docker-compose)")


def run_setup(*args: str, timeout: float) -> dict[str, str]:
    """Run setup.sh; its KEY=VALUE lines."""
    done = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"tests/compose/setup.sh {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if re.match(r"^[A-Z_]+=", line))


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    return run_setup("tools", timeout=600)


def compose_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


# --- quick checks ----------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean(tools: dict[str, str]) -> None:
    hadolint = tools.get("HADOLINT", "")
    if not os.access(hadolint, os.X_OK):
        missing_tool("hadolint")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_is_valid_for_docker_compose(tools: dict[str, str]) -> None:
    docker_compose = tools.get("DOCKER_COMPOSE", "")
    if not os.access(docker_compose, os.X_OK):
        missing_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDS_")}
    for settings in (
        {},
        {"ZDS_ENGINE_SOCKET": "/run/e.sock", "ZDS_BASE_IMAGE": "base:1", "ZDS_TAG": "x"},
    ):
        done = subprocess.run(
            [docker_compose, "-f", str(COMPOSE_FILE), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **settings},
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_privilege_lives_in_the_node_agent_and_ztunnel() -> None:
    services = compose_doc()["services"]
    assert set(services) == set(CAPABILITIES)
    for name, service in services.items():
        assert not service.get("privileged"), name
        assert service.get("cap_drop") == ["ALL"], name
        assert set(service.get("cap_add", [])) == CAPABILITIES[name], name
    # Nobody gets NET_RAW (Istio grants it; zds does without).
    assert not any("NET_RAW" in caps for caps in CAPABILITIES.values())
    for app in APPS:
        assert services[app]["user"] == "65534:65534", app


def test_the_applications_are_ordinary_labelled_containers_and_the_node_agent_watches_the_engine() -> None:
    services = compose_doc()["services"]
    for app in APPS:
        service = services[app]
        assert service["labels"]["istio.io/dataplane-mode"] == "ambient", app
        assert set(service["networks"]) == {"mesh"}, app  # a netns of its own, on the engine's network
        assert "volumes" not in service and "network_mode" not in service, app
    agent = services["node-agent"]
    assert "--container-engine=/var/run/zds-engine.sock" in agent["command"]
    assert "${ZDS_ENGINE_SOCKET:-/run/podman/podman.sock}:/var/run/zds-engine.sock" in agent["volumes"]
    assert ENGINE_NETNS in agent["volumes"] and agent["pid"] == "host"
    # In the node's netns (so it knows that netns, and refuses it as a pod's), and only this
    # file's containers are its own.
    assert agent["network_mode"] == "host"
    assert "--container-label=zds.io/node-agent=compose" in agent["command"]
    assert all(services[app]["labels"]["zds.io/node-agent"] == "compose" for app in APPS)
    # ztunnel gets each netns as an fd over the ZDS socket, never by path.
    assert not any("netns" in v for v in services["ztunnel"]["volumes"])
    # Nobody enrolls pods by hand.
    assert "zds pod add" not in COMPOSE_FILE.read_text()


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [
        word.rstrip("/")
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for word in line.split()[1:-1]
    ]
    assert sources
    for source in sources:
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
        assert (ROOT / source).exists(), source


# --- the scenario, for real --------------------------------------------------------------


class ComposeRun:
    """One podman-compose project: up, wait, logs, down; owns everything it makes."""

    def __init__(self, env: dict[str, str], project: str) -> None:
        self.project = project
        self.env = env
        self.compose = [env["PODMAN_COMPOSE"], "-p", project, "-f", str(COMPOSE_FILE)]

    def run(self, args: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and done.returncode != 0:
            pytest.fail(
                f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def podman(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], timeout, check)

    def container(self, service: str) -> str:
        out = self.podman(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        assert out, f"no container for service {service}"
        return out[0]

    def states(self) -> dict[str, tuple[str, int]]:
        """service -> (status, exit code) of each container of the project."""
        label = f"label=com.docker.compose.project={self.project}"
        ids = self.podman("ps", "-a", "-q", "--filter", label).stdout.split()
        if not ids:
            return {}
        out = self.podman(
            "inspect",
            "--format",
            '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{.State.ExitCode}}',
            *ids,
        ).stdout
        states = {}
        for line in out.splitlines():
            service, status, code = line.split()
            states[service] = (status, int(code))
        return states

    def wait_for_check(self, timeout: float) -> int:
        """The check's exit code; fails at once if another service stops first."""

        def exited() -> tuple[int] | None:
            states = self.states()
            state, code = states.get("check", ("missing", -1))
            if state == "exited":
                return (code,)
            stopped = {s: st for s, st in states.items() if s != "check" and st[0] != "running"}
            if stopped:
                pytest.fail(f"services stopped before check finished: {stopped}\n{self.logs()}")
            return None

        try:
            # Each look runs podman twice: once a second is often enough.
            [code] = wait_until(exited, "the check service to exit", timeout, interval=1.0)
        except AssertionError:
            pytest.fail(f"check did not finish within {timeout:g}s\n{self.logs()}")
        return code

    def logs(self) -> str:
        parts = []
        for service in CAPABILITIES:
            try:
                name = self.container(service)
            except (AssertionError, pytest.fail.Exception):
                parts.append(f"===== {service}: no container")
                continue
            done = self.podman("logs", name, check=False)
            text = "\n".join(
                line for line in (done.stdout + done.stderr).splitlines() if "systemd connection" not in line
            )
            parts.append(f"===== {service} ({name})\n{text[-12000:]}")
        return "\n".join(parts)

    def down(self) -> list[str]:
        """Stop and remove everything; what could not be removed, for the test to report."""
        problems = []
        done = self.run([*self.compose, "down", "-v", "-t", "20"], timeout=180, check=False)
        if done.returncode != 0:
            problems.append(f"podman-compose down: {done.stderr[-2000:]}")
        label = f"label=com.docker.compose.project={self.project}"
        left = self.podman("ps", "-a", "-q", "--filter", label, check=False).stdout.split()
        if left:
            problems.append(f"containers left after down: {left}")
            self.podman("rm", "-f", "-t", "5", *left, check=False)
        volumes = self.podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
        if volumes:
            problems.append(f"volumes left after down: {volumes}")
            self.podman("volume", "rm", "-f", *volumes, check=False)
        return problems


def share_netns_dir(path: str = "/run/netns") -> None:
    """Make Podman's netns directory a shared mount, as ``ip netns add`` does the first time (a
    bind mount of itself, shared; left so: iproute2 and Podman keep it so too). The node agent's
    ``rslave`` mount of it sees the containers' namespaces made after it started only then:
    on a host where none was ever made, it saw empty files (README, "With Podman")."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "--make-shared", path], capture_output=True).returncode != 0:
        subprocess.run(["mount", "--bind", path, path], check=True, capture_output=True)
        subprocess.run(["mount", "--make-shared", path], check=True, capture_output=True)


@pytest.fixture
def compose_run(tmp_path: pathlib.Path) -> Iterator[ComposeRun]:
    started = time.time()
    setup = run_setup("all", timeout=1200)
    share_netns_dir()
    project = f"zdsci{os.getpid()}"
    # Podman with the compose network's CNI config in a directory of the test's own.
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conf = tmp_path / "containers.conf"
    conf.write_text(
        pathlib.Path(setup["CONTAINERS_CONF"]).read_text()
        + f'\n[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{conf_dir}"\n'
    )
    engine = tmp_path / "podman.sock"
    env = {
        **os.environ,
        **setup,
        "CONTAINERS_CONF": str(conf),
        "ZDS_ENGINE_SOCKET": str(engine),
        "ZDS_TAG": TAG,
    }
    run = ComposeRun(env, project)
    problems: list[str] = []
    with open(tmp_path / "podman-service.log", "wb") as service_log:
        service = subprocess.Popen(
            ["podman", "system", "service", "--time", "0", f"unix://{engine}"],
            env=env,
            stdout=service_log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: engine.exists(), "the podman API socket")
        yield run
    finally:
        problems += run.down()
        for network in run.podman(
            "network", "ls", "-q", "--filter", f"name={project}", check=False
        ).stdout.split():
            problems.append(f"network left after down: {network}")
            run.podman("network", "rm", "-f", network, check=False)
        # host-local IPAM's state of the project's network (Podman leaves it): ours, by its name.
        shutil.rmtree(f"/var/lib/cni/networks/{project}_mesh", ignore_errors=True)
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        # Images this run replaced (untagged now, and older than this run); the current
        # ones stay as the build cache for the next run.
        run.podman("image", "prune", "-f", "--filter", f"until={int(started)}", check=False)
    assert not problems, "\n".join(problems)


@pytest.mark.root
@pytest.mark.slow
def test_compose_scenario_labelled_containers_join_the_mesh_by_themselves(compose_run: ComposeRun) -> None:
    run = compose_run
    run.run(
        # One build at a time: the first fills the layer cache the others then reuse. Docker
        # image format, or podman drops HEALTHCHECK; host network: no container network here.
        [*run.compose, "--parallel", "1", "--podman-build-args", "--network host --format docker", "build"],
        timeout=1200,
    )
    run.run([*run.compose, "up", "-d", "--no-build"], timeout=300)
    code = run.wait_for_check(timeout=300)
    logs = run.logs()
    assert code == 0, f"check exited with {code}\n{logs}"
    # ztunnel knows each workload by its container's name (as a DNS name).
    [line] = [
        x
        for x in run.podman("logs", run.container("check")).stdout.splitlines()
        if x.startswith("workloads: ")
    ]
    names = json.loads(line.removeprefix("workloads: "))
    assert names == {app: dns_name(run.container(app), 253) for app in APPS}, logs
    # Nobody enrolled them by hand: the node agent's container engine source did.
    listed = run.podman(
        "exec", run.container("node-agent"), "zds", "pod", "list", "--json",
        "--control-socket", "/var/run/zds/control.sock",
    ).stdout  # fmt: skip
    assert sorted(p["source"] for p in json.loads(listed)) == ["container-engine", "container-engine"], listed
    # The images' HEALTHCHECKs: node agent /readyz, ztunnel /healthz/ready (podman runs them
    # on demand here: it has no systemd to schedule them).
    dockerfile = DOCKERFILE.read_text()
    for service, url in HEALTH_URLS.items():
        assert f'"{url}"' in dockerfile, f"the Dockerfile's HEALTHCHECK of {service} is not {url}"
        started = time.monotonic()
        health = run.podman("healthcheck", "run", run.container(service), check=False)
        if health.returncode != 0:
            # What the endpoint says now, and how long the check took (its timeout is 3 s):
            # tells a probe that failed from one that was slow.
            took = time.monotonic() - started
            body = run.podman("exec", run.container(service), "zds-get", url, check=False)
            raise AssertionError(
                f"{service} healthcheck ({took:.1f} s): {health.stdout}{health.stderr}; {url} now: "
                f"exit {body.returncode} {body.stdout}{body.stderr}\n{logs}"
            )
    print(logs)
