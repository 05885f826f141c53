"""Issue 9 point 4: no shipped cluster config exposes the Ray dashboard / Jobs API (8265), GCS
(6379) or the client port (10001) beyond loopback without token authentication, and none
holds a token. `exposure()` checks one config; the test runs it over every shipped file and
over small bad configs (one per rule) to prove that it catches what it should."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_PORTS = {"8265", "6379", "10001"}
HEX_TOKEN = re.compile(r"\b[0-9a-f]{32,}\b")


def shipped() -> list[Path]:
    skip = {"jobs", "runtime_env", "deepspeed"}
    files = [p for p in sorted((ROOT / "cluster_configs").rglob("*.yaml")) if not skip & set(p.parts)]
    return files + [ROOT / "docker" / "compose.yaml", ROOT / "docker" / "Dockerfile.cpu",
                    ROOT / "docker" / "Dockerfile.cuda"]


def _dashboard_public(cmd: str) -> bool:
    """A `ray start --head` command whose dashboard listens beyond loopback (Ray 2.60's
    default --dashboard-host is 127.0.0.1)."""
    m = re.search(r"--dashboard-host[= ]+\"?([0-9.a-z:]+)", cmd)
    return bool(m) and m.group(1) not in ("127.0.0.1", "localhost")


def _env_list_auth(env) -> tuple[bool, list[str]]:
    """(token mode set, problems) of a Kubernetes container env list."""
    on, bad = False, []
    for e in env or []:
        if e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token":
            on = True
        if e.get("name") == "RAY_AUTH_TOKEN" and "value" in e:
            bad.append("RAY_AUTH_TOKEN has a literal value (use valueFrom.secretKeyRef)")
    return on, bad


def exposure(name: str, text: str) -> list[str]:
    """Problems of one config file (by its name's kind), [] when it is safe."""
    problems = []
    if re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[0-9A-Za-z_\-]{8,}", text) or HEX_TOKEN.search(text):
        problems.append("a literal token value")
    if name.startswith("Dockerfile"):
        auth = re.search(r"^ENV\s+(?:.*\\\n)*?.*RAY_AUTH_MODE=token", text, re.M) is not None
        for cmd in re.findall(r"^CMD\s+(.*)$", text, re.M):
            if "--head" in cmd and _dashboard_public(cmd.replace('", "', " ")) and not auth:
                problems.append("CMD binds the dashboard beyond loopback without RAY_AUTH_MODE=token")
        return problems
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        return problems + ["not a mapping"]
    if "services" in doc:                                            # docker compose
        for svc, spec in (doc.get("services") or {}).items():
            env = spec.get("environment") or {}
            env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
            auth = env.get("RAY_AUTH_MODE") == "token"
            for port in spec.get("ports") or []:
                parts = str(port).split(":")
                container = parts[-1].split("/")[0]
                if container in RAY_PORTS and not (len(parts) == 3 and parts[0] in ("127.0.0.1", "localhost")):
                    problems.append(f"{svc}: port {port} published beyond loopback")
            cmd = " ".join(spec.get("command") or []) if isinstance(spec.get("command"), list) else str(spec.get("command", ""))
            if "--head" in cmd and _dashboard_public(cmd) and not auth:
                problems.append(f"{svc}: dashboard beyond loopback without RAY_AUTH_MODE=token")
            if "RAY_AUTH_TOKEN" in env:
                problems.append(f"{svc}: RAY_AUTH_TOKEN in the environment (use a secret file)")
        return problems
    if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):   # KubeRay
        spec = doc["spec"].get("rayClusterSpec", doc["spec"]) if doc["kind"] == "RayJob" else doc["spec"]
        head = spec.get("headGroupSpec") or {}
        if head.get("serviceType", "ClusterIP") in ("LoadBalancer", "NodePort"):
            problems.append(f"head Service of type {head['serviceType']} exposes the dashboard")
        groups = [("head", head)] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []]
        for gname, g in groups:
            for c in g.get("template", {}).get("spec", {}).get("containers", []):
                on, bad = _env_list_auth(c.get("env"))
                problems += [f"{gname}/{c.get('name')}: {b}" for b in bad]
                if not on:
                    problems.append(f"{gname}/{c.get('name')}: no RAY_AUTH_MODE=token")
        params = head.get("rayStartParams") or {}
        host = str(params.get("dashboard-host", "127.0.0.1"))
        if host not in ("127.0.0.1", "localhost") and any("no RAY_AUTH_MODE" in p for p in problems if p.startswith("head/")):
            problems.append("dashboard beyond loopback on a head without token authentication")
        if doc["kind"] == "RayJob":
            sub = doc["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
            if not sub or not all(_env_list_auth(c.get("env"))[0] for c in sub):
                problems.append("the RayJob submitter has no token authentication")
        return problems
    if "head_start_ray_commands" in doc:                               # cluster launcher
        for cmd in doc.get("head_start_ray_commands") or []:
            if "ray start" in cmd and "--head" in cmd:
                if "RAY_AUTH_MODE=token" not in cmd:
                    problems.append("head started without RAY_AUTH_MODE=token")
                if _dashboard_public(cmd):
                    problems.append("head dashboard beyond loopback (use the ray dashboard SSH tunnel)")
        for cmd in doc.get("worker_start_ray_commands") or []:
            if "ray start" in cmd and "RAY_AUTH_MODE=token" not in cmd:
                problems.append("worker started without RAY_AUTH_MODE=token")
        return problems
    return problems + ["unrecognised cluster config"]


@pytest.mark.parametrize("path", shipped(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_expose_nothing_without_token_auth(path):
    assert exposure(path.name, path.read_text()) == []


BAD = {
    "compose-public-port": ("compose.yaml", """
services:
  ray-head:
    command: ["ray", "start", "--head", "--dashboard-host=0.0.0.0"]
    environment: {RAY_AUTH_MODE: token}
    ports: ["8265:8265"]
"""),
    "compose-gcs-published": ("compose.yaml", """
services:
  ray-head:
    command: ["ray", "start", "--head"]
    environment: {RAY_AUTH_MODE: token}
    ports: ["0.0.0.0:6379:6379"]
"""),
    "compose-no-auth": ("compose.yaml", """
services:
  ray-head:
    command: ["ray", "start", "--head", "--dashboard-host=0.0.0.0"]
    ports: ["127.0.0.1:8265:8265"]
"""),
    "compose-token-in-env": ("compose.yaml", """
services:
  ray-head:
    command: ["ray", "start", "--head"]
    environment: {RAY_AUTH_MODE: token, RAY_AUTH_TOKEN: hunter2hunter2}
"""),
    "launcher-public-dashboard": ("aws.yaml", """
head_start_ray_commands:
  - export RAY_AUTH_MODE=token; ray start --head --dashboard-host=0.0.0.0
worker_start_ray_commands:
  - export RAY_AUTH_MODE=token; ray start --address=$RAY_HEAD_IP:6379
"""),
    "launcher-no-auth": ("gcp.yaml", """
head_start_ray_commands:
  - ray start --head --dashboard-host=127.0.0.1
worker_start_ray_commands:
  - ray start --address=$RAY_HEAD_IP:6379
"""),
    "kuberay-no-auth": ("raycluster.yaml", """
kind: RayCluster
spec:
  headGroupSpec:
    rayStartParams: {dashboard-host: "0.0.0.0"}
    template: {spec: {containers: [{name: ray-head}]}}
"""),
    "kuberay-literal-token": ("raycluster.yaml", """
kind: RayCluster
spec:
  headGroupSpec:
    template: {spec: {containers: [{name: ray-head, env: [{name: RAY_AUTH_MODE, value: token},
                                                           {name: RAY_AUTH_TOKEN, value: s3cr3t}]}]}}
"""),
    "kuberay-loadbalancer": ("raycluster.yaml", """
kind: RayCluster
spec:
  headGroupSpec:
    serviceType: LoadBalancer
    template: {spec: {containers: [{name: ray-head, env: [{name: RAY_AUTH_MODE, value: token}]}]}}
"""),
    "rayjob-submitter-no-auth": ("rayjob.yaml", """
kind: RayJob
spec:
  rayClusterSpec:
    headGroupSpec:
      template: {spec: {containers: [{name: ray-head, env: [{name: RAY_AUTH_MODE, value: token}]}]}}
"""),
    "dockerfile-no-auth": ("Dockerfile.cpu", """
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1
CMD ["ray", "start", "--head", "--block", "--dashboard-host=0.0.0.0"]
"""),
    "hex-token-anywhere": ("aws.yaml", """
head_start_ray_commands:
  - export RAY_AUTH_MODE=token; ray start --head  # token 0123456789abcdef0123456789abcdef
"""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_checker_catches_each_kind_of_exposure(case):
    name, text = BAD[case]
    assert exposure(name, text), f"{case} was not flagged"
