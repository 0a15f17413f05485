"""The deployment files, checked as far as a machine without Docker or Kubernetes allows:
compose.yaml against the Compose specification's schema, every manifest in deploy/k8s against
the Kubernetes API schemas, the cross-references between them and the code (variables each
component reads, modules, ports, selectors, the catalog, the dashboard's metrics and PromQL),
and docs/operations.md's commands run as written against the embedded stack."""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import controlplane.settings
import dataplane.settings
import workeragent.settings
from loraplane.catalog import Catalog
from loraplane.config import env_names
from loraplane.controlplane.v1 import admin_pb2, tenant_pb2, worker_pb2
from loraplane.limits import MAX_ADAPTER_BYTES
from loraplane.logs import LogSettings
from loraplane.stack import http_ok, wait_until
from tests.conftest import SimStack, new_tenant, upload
from tests.support import free_port, lora_tensors, safetensors_bytes

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33"
OPS_DOC = ROOT / "docs" / "operations.md"

# The package whose code runs in each `python -m` module, and so reads its settings.
PACKAGE = {"controlplane.server": "controlplane", "dataplane.app": "dataplane", "workeragent.agent": "workeragent"}
SETTINGS: dict[str, type[Any]] = {
    "controlplane": controlplane.settings.Settings,
    "dataplane": dataplane.settings.Settings,
    "workeragent": workeragent.settings.Settings,
}
# Variables read by libraries the components run, not by loraplane's own code.
THIRD_PARTY = {"HF_HUB_OFFLINE": "huggingface_hub, under vLLM", "HF_HOME": "huggingface_hub"}
# The secrets each component may hold: none other (a data plane forwards each user's own key).
SECRETS = {
    "LORAPLANE_OPERATOR_TOKEN",
    "LORAPLANE_AGENT_TOKEN",
    "LORAPLANE_PEER_TOKEN",
    "LORAPLANE_WORKER_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
}
ALLOWED_SECRETS = {
    "controlplane": {
        "LORAPLANE_OPERATOR_TOKEN",
        "LORAPLANE_AGENT_TOKEN",
        "LORAPLANE_PEER_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
    },
    "dataplane": {"LORAPLANE_WORKER_API_KEY"},
    "workeragent": {"LORAPLANE_AGENT_TOKEN", "LORAPLANE_WORKER_API_KEY", "AWS_SECRET_ACCESS_KEY"},
}
S3_ENV = {
    "LORAPLANE_ARTIFACT_STORE": "s3://loraplane/artifacts",
    "LORAPLANE_S3_ENDPOINT_URL": "http://minio:9000",
}

# The metrics the components export (issue 8), their labels and type.
COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "loraplane_requests_total": (COUNTER, frozenset({"component", "base_model", "status"})),
    "loraplane_request_seconds": (HISTOGRAM, frozenset({"base_model"})),
    "loraplane_time_to_first_token_seconds": (HISTOGRAM, frozenset({"base_model"})),
    "loraplane_adapter_loads_total": (COUNTER, frozenset({"base_model", "result"})),
    "loraplane_adapter_evictions_total": (COUNTER, frozenset({"base_model"})),
    "loraplane_adapter_load_seconds": (HISTOGRAM, frozenset({"base_model"})),
    "loraplane_routing_total": (COUNTER, frozenset({"result"})),
    "loraplane_cold_placements_waiting": (GAUGE, frozenset()),
    "loraplane_worker_requests_running": (GAUGE, frozenset({"worker"})),
    "loraplane_worker_requests_waiting": (GAUGE, frozenset({"worker"})),
    "loraplane_worker_lora_slots_used": (GAUGE, frozenset({"worker"})),
    "loraplane_worker_lora_slots": (GAUGE, frozenset({"worker"})),
    "loraplane_redis_up": (GAUGE, frozenset({"component"})),
    "loraplane_controlplane_up": (GAUGE, frozenset({"component"})),
    "loraplane_agents_connected": (GAUGE, frozenset({"base_model"})),
    "loraplane_upload_bytes_total": (COUNTER, frozenset()),
    "loraplane_upload_rejections_total": (COUNTER, frozenset({"reason"})),
    "loraplane_tokens_total": (COUNTER, frozenset({"base_model", "tier", "direction"})),
    "loraplane_metered_requests_total": (COUNTER, frozenset({"base_model", "tier"})),
    "loraplane_rate_limited_total": (COUNTER, frozenset({"reason"})),
    "loraplane_queue_depth": (GAUGE, frozenset({"base_model", "tier"})),
    "loraplane_queue_wait_seconds": (HISTOGRAM, frozenset({"tier"})),
    "loraplane_queue_rejected_total": (COUNTER, frozenset({"tier", "reason"})),
}
TARGET_LABELS = frozenset({"instance", "job", "node"})  # added by Prometheus to every series
# Where the control plane and the agent serve /metrics unless LORAPLANE_METRICS_ADDR says otherwise.
METRICS_PORT = {"controlplane": 9090, "workeragent": 9091}


def metrics_port(env: dict[str, Any], package: str) -> int:
    """The port of LORAPLANE_METRICS_ADDR (host:port), or the package's default; the metrics
    must listen on all interfaces for Prometheus to reach them."""
    addr = env.get("LORAPLANE_METRICS_ADDR")
    if addr is None:
        return METRICS_PORT[package]
    host, _, port = str(addr).rpartition(":")
    assert host == "0.0.0.0", f"{package} serves /metrics on {addr}: unreachable from Prometheus"
    return int(port)


# --- shared readers ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = compose()["services"]
    return out


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every Kubernetes object in deploy/k8s."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None and doc.get("kind") != "Kustomization":
                out.append((path.name, doc))
    return out


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    """A container's variables: its ConfigMap-sourced ones (value: the ConfigMap's), then its own."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(k8s("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def component(command: list[str]) -> str | None:
    if command[:2] == ["python", "-m"]:
        return PACKAGE.get(command[2])
    return None


def reads(package: str) -> set[str]:
    """Environment variable names the package reads, as its settings declare them (the S3 ones
    included), with those of the log setup every component's entry point calls."""
    return env_names(SETTINGS[package]) | env_names(LogSettings)


def documented() -> set[str]:
    """Variable names in docs/configuration.md, brace groups expanded (`LORAPLANE_TIER_{A,B}_X`)."""
    names = set()
    for raw in re.findall(r"`((?:LORAPLANE|AWS|HF)_[A-Z0-9_{},]+)`", (ROOT / "docs" / "configuration.md").read_text()):
        group = re.search(r"\{([A-Z,]+)\}", raw)
        if group:
            names |= {raw.replace(group.group(0), part) for part in group.group(1).split(",")}
        else:
            names.add(raw)
    return names


def deployed_processes() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, package, environment) of every loraplane process compose.yaml or deploy/k8s runs."""
    for name, svc in services().items():
        package = component(svc.get("command", []))
        if package:
            yield f"compose {name}", package, svc.get("environment", {})
    for workload in workloads():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            package = component(c.get("command", []))
            if package:
                yield f"k8s {workload['metadata']['name']}/{c['name']}", package, container_env(c)


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


# --- compose.yaml -----------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendor.read_text())
    return schema


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_matches_the_compose_specification() -> None:
    assert compose_errors(compose()) == []
    # The schema is strict enough to matter: a misspelt key fails.
    broken = compose()
    broken["services"]["agent"]["comand"] = broken["services"]["agent"].pop("command")
    assert any("comand" in e for e in compose_errors(broken))


def test_compose_runs_the_whole_layout() -> None:
    svc = services()
    packages = [component(s.get("command", [])) for s in svc.values()]
    assert packages.count("controlplane") == 2 and packages.count("dataplane") == 2
    assert packages.count("workeragent") >= 1
    assert {"redis", "minio", "minio-init", "lb", "prometheus", "grafana"} <= set(svc)
    assert svc["prometheus"]["profiles"] == ["monitoring"] == svc["grafana"]["profiles"]
    for name, s in svc.items():
        command = s.get("command", [])
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"


def test_compose_redis_appends_and_fsyncs() -> None:
    command = services()["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] in ("always", "everysec")
    assert flags["--maxmemory-policy"] == "noeviction"
    assert "appendfsync" in (ROOT / "docs" / "operations.md").read_text()


def test_compose_control_planes_reach_each_other_and_are_reached() -> None:
    svc = services()
    planes = {n: s for n, s in svc.items() if component(s.get("command", [])) == "controlplane"}
    aliases = [set(s["networks"]["default"]["aliases"]) for s in planes.values()]
    shared = set.intersection(*aliases)
    assert shared, "the control planes share no network alias"
    for name, s in planes.items():
        env = s["environment"]
        advertised, port = host_port(env["LORAPLANE_ADVERTISE_ADDR"])
        assert advertised == name, f"{name} advertises {advertised}, which is not itself"
        assert port == host_port(env["LORAPLANE_GRPC_ADDR"])[1]
        assert "127.0.0.1:" not in env["LORAPLANE_GRPC_ADDR"], f"{name} listens on loopback only"
    for name, s in svc.items():
        addr = s.get("environment", {}).get("LORAPLANE_CONTROLPLANE_ADDR")
        if addr:
            assert host_port(addr)[0] in shared | set(planes), f"{name}: {addr} is no control plane"


def test_compose_data_planes_are_behind_the_balancer() -> None:
    svc = services()
    planes = {n: s for n, s in svc.items() if component(s.get("command", [])) == "dataplane"}
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    upstream = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", conf, re.M))
    assert upstream == {f"{n}:{s['environment']['LORAPLANE_HTTP_PORT']}" for n, s in planes.items()}
    for s in planes.values():
        assert s["environment"]["LORAPLANE_HTTP_HOST"] == "0.0.0.0"
    # Both ways streamed, and a 500 MB adapter fits.
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;"):
        assert directive in conf
    size = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert size is not None and int(size.group(1)) * 1_000_000 >= MAX_ADAPTER_BYTES
    assert "lb" in svc and any(p.endswith(":8080") for p in svc["lb"]["ports"])


def test_the_balancer_streams_both_ways(sim_stack: SimStack, tmp_path: Path) -> None:
    """deploy/nginx.conf run by a real nginx in front of the embedded stack's data plane (as both
    upstream servers): an upload passes through whole, an SSE answer arrives as events."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed here (Debian package `nginx`)")
    stack = sim_stack.stack
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = re.sub(r"dataplane-\d+:8080", f"127.0.0.1:{stack.config.http_port}", conf)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("/tmp/nginx.pid", str(tmp_path / "pid"))
    temp = "".join(f"  {d}_temp_path {tmp_path / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    (tmp_path / "nginx.conf").write_text(conf)
    args = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen([*args, "-g", "daemon off;"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(url + "/readyz"), 10, "nginx", proc)
        key = new_tenant(stack, "behind-nginx")
        weights = safetensors_bytes(lora_tensors(rank=8))
        r = httpx.post(
            url + "/v1/adapters/upload",
            headers={"Authorization": f"Bearer {key}"},
            data={"name": "lb", "base_model": "tiny-llama"},
            files={"file": ("adapter_model.safetensors", weights)},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        assert r.json()["size_bytes"] == len(weights)
        body = {"model": "tiny-llama:lb", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert len(events) > 2 and events[-1] == "data: [DONE]"
        assert json.loads(events[0][6:])["model"] == "tiny-llama:lb"
    finally:
        proc.terminate()
        proc.wait(10)


def test_compose_worker_node_and_its_vllm() -> None:
    agent = services()["agent"]
    env = agent["environment"]
    assert agent["build"]["target"] == "worker"
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    url = urlsplit(env["LORAPLANE_ADVERTISE_URL"])
    assert url.hostname in ("agent", agent["hostname"]) and url.port == int(env["LORAPLANE_VLLM_PORT"])
    assert env["LORAPLANE_VLLM_HOST"] == "0.0.0.0"
    assert "LORAPLANE_VLLM_URL" not in env, "the agent starts and guards its own vLLM"
    catalog = Catalog.load(ROOT / "deploy" / "catalog.json")
    model = catalog.get(env["LORAPLANE_BASE_MODEL"])
    assert model is not None
    mounts = [v.split(":")[1] for v in agent["volumes"]]
    assert any(model.path.startswith(m + "/") for m in mounts), f"{model.path} is not mounted"
    # No stale claim that the worker API key guards LoRA loading: the agent's secret does.
    text = (ROOT / "compose.yaml").read_text()
    assert "vllmguard" in text and "need the worker API key" not in text


def test_compose_artifact_store_is_shared_s3() -> None:
    svc = services()
    for name, s in svc.items():
        if component(s.get("command", [])) in ("controlplane", "workeragent"):
            env = s["environment"]
            for var, value in S3_ENV.items():
                assert env[var] == value, f"{name}: {var}"
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
                assert var in env, f"{name}: no {var}"
    for where, package, env in deployed_processes():
        if package in ("controlplane", "workeragent"):
            assert env["LORAPLANE_ARTIFACT_STORE"] == S3_ENV["LORAPLANE_ARTIFACT_STORE"], where
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env), where
    store = urlsplit(S3_ENV["LORAPLANE_ARTIFACT_STORE"])
    init = "\n".join(svc["minio-init"]["command"])
    assert f"mc mb --ignore-existing store/{store.netloc}" in init
    endpoint = urlsplit(S3_ENV["LORAPLANE_S3_ENDPOINT_URL"])
    assert endpoint.hostname in svc and f"http://{endpoint.netloc}" in init
    policy = json.loads((ROOT / "deploy" / "minio" / "loraplane-policy.json").read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {f"arn:aws:s3:::{store.netloc}", f"arn:aws:s3:::{store.netloc}{store.path}/*"}
    assert svc["controlplane-1"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_variables_come_from_env_example() -> None:
    """Every ${VAR} compose needs is in .env.example, every line there is used, and after
    interpolation with those names set nothing is left unresolved."""
    text = (ROOT / "compose.yaml").read_text()
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if re.match(r"^[A-Z_]+=", line)
    )
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    required = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):\?", text))
    assert required <= set(example), f"not in .env.example: {required - set(example)}"
    assert set(example) <= used, f"in .env.example but unused: {set(example) - used}"

    def interpolate(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3) or ""
        return "x" * 24 if name in example else default

    rendered = re.sub(r"(?<!\$)\$\{([A-Z0-9_]+)(:[-?]([^}]*))?\}", interpolate, text)
    assert "${" not in rendered.replace("$${", "")
    data = yaml.safe_load(rendered)
    assert compose_errors(data) == []
    redis_url = data["services"]["controlplane-1"]["environment"]["LORAPLANE_REDIS_URL"]
    assert urlsplit(redis_url).password == "x" * 24 and urlsplit(redis_url).hostname == "redis"


def test_dockerfile_builds_the_images_compose_uses() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.M | re.I))
    for name, s in services().items():
        build = s.get("build")
        if build:
            assert build["target"] in stages, f"{name}: no stage {build['target']}"
    for package in PACKAGE.values():
        assert f"COPY {package} {package}" in dockerfile
    assert re.search(r'pip install "\.\[vllm\]"', dockerfile), "the worker image installs vLLM"


# --- every deployed process -------------------------------------------------------------------


def test_every_variable_is_read_by_its_component_and_documented() -> None:
    docs = documented()
    for where, package, env in deployed_processes():
        read = reads(package)
        for var in env:
            if var in THIRD_PARTY or not re.match(r"(LORAPLANE|AWS|HF)_", var):
                continue
            assert var in read, f"{where}: {var} is set but {package} never reads it"
            assert var in docs, f"{where}: {var} is not in docs/configuration.md"


def test_every_variable_a_component_reads_is_documented() -> None:
    missing = {package: reads(package) - documented() for package in SETTINGS}
    assert missing == dict.fromkeys(SETTINGS, set()), f"not in docs/configuration.md: {missing}"


def test_every_process_holds_only_its_own_secrets() -> None:
    for where, package, env in deployed_processes():
        extra = (set(env) & SECRETS) - ALLOWED_SECRETS[package]
        assert not extra, f"{where} holds {extra}"


# --- deploy/k8s -------------------------------------------------------------------------------


def test_k8s_manifests_match_the_api_schemas() -> None:
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {"StatefulSet", "Deployment", "DaemonSet", "Service", "Secret", "ConfigMap"}
    for _, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises, naming the field
    broken = copy.deepcopy(k8s("Deployment", "controlplane"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_placeholder_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.yaml"}
    assert set(kustomization["resources"]) == files
    assert all(doc["metadata"].get("namespace", "loraplane") == "loraplane" for _, doc in manifests())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert images == {"loraplane": version, "loraplane-worker": version}
    for workload in workloads():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            repo, _, tag = c["image"].partition(":")
            if component(c.get("command", [])):
                expected = "loraplane-worker" if component(c["command"]) == "workeragent" else "loraplane"
                assert (repo, tag) == (expected, version), c["image"]
    # compose builds the same two images
    targets = {s["image"].split(":")[0]: s["build"]["target"] for s in services().values() if "build" in s}
    assert targets == {"loraplane": "app", "loraplane-worker": "worker"}


def _selected(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pods(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [w for w in workloads() if _selected(selector, w["spec"]["template"]["metadata"]["labels"])]


def _port_names(workload: dict[str, Any]) -> set[str]:
    return {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}


def test_k8s_selectors_and_ports_match_the_pods() -> None:
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selected(workload["spec"]["selector"]["matchLabels"], labels), workload["metadata"]["name"]
    for _, doc in manifests():
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Service":
            pods = _pods(doc["spec"]["selector"])
            assert len(pods) == 1, f"Service {name} selects {len(pods)} workloads"
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in _port_names(pods[0]), f"Service {name}: {port['targetPort']}"
        elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
            pods = _pods(selector)
            assert len(pods) == 1, f"{kind} {name} selects {len(pods)} workloads"
            for rule in doc["spec"].get("ingress", []):
                for port in rule["ports"]:
                    assert port["port"] in _port_names(pods[0]), f"{kind} {name}: {port['port']}"
                for peer in rule["from"]:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        assert _pods(peer["podSelector"]["matchLabels"]), f"{kind} {name}: no such peer"
        elif kind == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            k8s(ref["kind"], ref["name"])
        elif kind == "Ingress":
            for rule in doc["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    ports = [p["name"] for p in k8s("Service", backend["name"])["spec"]["ports"]]
                    assert backend["port"]["name"] in ports
    redis = k8s("StatefulSet", "redis")
    assert k8s("Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_k8s_references_resolve() -> None:
    """Secrets and ConfigMaps exist with the keys asked for; $(VAR) names a variable set earlier;
    probes use ports the container has."""
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"]:
            seen = set()
            for source in c.get("envFrom", []):
                seen |= set(k8s("ConfigMap", source["configMapRef"]["name"])["data"])
            for var in c.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                    assert ref in seen, f"{c['name']}: {var['name']} uses $({ref}) before it is set"
                secret = var.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["key"] in k8s("Secret", secret["name"])["stringData"], var["name"]
                seen.add(var["name"])
            for arg in c.get("args", []):
                for ref in re.findall(r"\$\((\w+)\)", arg):
                    assert ref in seen, f"{c['name']}: an argument uses $({ref}), never set"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                for handler in ("httpGet", "grpc"):
                    port = c.get(probe, {}).get(handler, {}).get("port")
                    if port is not None:
                        assert port in ports or port in ports.values(), f"{c['name']} {probe}: port {port}"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{c['name']}: no volume {mount['name']}"
                volume = volumes[mount["name"]]
                if "configMap" in volume:
                    k8s("ConfigMap", volume["configMap"]["name"])


def test_k8s_control_plane_advertises_its_pod_ip_and_probes_grpc_health() -> None:
    (c,) = k8s("Deployment", "controlplane")["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v for v in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    grpc_port = host_port(env["LORAPLANE_GRPC_ADDR"]["value"])[1]
    assert env["LORAPLANE_ADVERTISE_ADDR"]["value"] == f"$(POD_IP):{grpc_port}"
    assert k8s("Deployment", "controlplane")["spec"]["replicas"] == 2
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port
    service = k8s("Service", "controlplane")
    assert {p["port"] for p in service["spec"]["ports"]} >= {grpc_port}
    metrics = metrics_port(container_env(c), "controlplane")
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == metrics
    # health is what the server registers (controlplane/server.py) and the probe asks for ("")
    source = (ROOT / "controlplane" / "server.py").read_text()
    assert "add_HealthServicer_to_server" in source and 'for name in ["", *SERVICE_NAMES]' in source


def test_k8s_data_plane_probes_its_health_routes() -> None:
    deployment = k8s("Deployment", "dataplane")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert deployment["spec"]["replicas"] == 2
    source = (ROOT / "dataplane" / "app.py").read_text()
    routes = set(re.findall(r'Route\("(/[a-z]+)"', source))
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in routes
    env = container_env(c)
    assert c["ports"][0]["containerPort"] == int(env["LORAPLANE_HTTP_PORT"])


def test_k8s_agent_runs_on_every_gpu_node() -> None:
    daemonset = k8s("DaemonSet", "agent")
    spec = daemonset["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = container_env(c)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    vllm_port = int(env["LORAPLANE_VLLM_PORT"])
    assert env["LORAPLANE_ADVERTISE_URL"] == f"http://$(POD_IP):{vllm_port}"
    assert "$(NODE_NAME)" in env["LORAPLANE_WORKER_ID"], "a worker id per node, stable across restarts"
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "vllm"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["vllm"] == vllm_port
    metrics = metrics_port(env, "workeragent")
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == metrics
    # vLLM's /health must be a path its guard lets through
    from workeragent import vllmguard

    assert "/health" in vllmguard.SERVING_PATHS and "/metrics" in vllmguard.SERVING_PATHS
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert env["LORAPLANE_CACHE_DIR"] in mounts


def test_k8s_catalog_is_deploy_catalog_and_needs_no_model_files() -> None:
    configmap = k8s("ConfigMap", "loraplane-catalog")
    assert json.loads(configmap["data"]["catalog.json"]) == json.loads((ROOT / "deploy" / "catalog.json").read_text())
    catalog = Catalog.load(ROOT / "deploy" / "catalog.json")  # loads without the model's files
    for model in catalog.models.values():
        assert model.architecture is not None or not model.lora
    env = container_env(k8s("DaemonSet", "agent")["spec"]["template"]["spec"]["containers"][0])
    assert catalog.get(env["LORAPLANE_BASE_MODEL"]) is not None
    assert env["LORAPLANE_CATALOG"].endswith("/catalog.json")
    for var, value in S3_ENV.items():
        if var != "LORAPLANE_S3_ENDPOINT_URL":  # a cluster's own store, or none for AWS
            assert k8s("ConfigMap", "loraplane-artifact-store")["data"][var] == value


def test_k8s_redis_persists_with_aof() -> None:
    redis = k8s("StatefulSet", "redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    flags = dict(zip(c["args"][1::2], c["args"][2::2], strict=False))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] in ("always", "everysec")
    assert flags["--dir"] in {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data"}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    for _, _, env in deployed_processes():
        url = env.get("LORAPLANE_REDIS_URL")
        if isinstance(url, str) and "$(" in url:
            assert urlsplit(url.replace("$(REDIS_PASSWORD)", "x")).hostname == "redis"


# --- Prometheus and the dashboard ---------------------------------------------------------------


def _targets(config: dict[str, Any]) -> dict[str, set[str]]:
    return {
        job["job_name"]: {t for sc in job.get("static_configs", []) for t in sc["targets"]}
        for job in config["scrape_configs"]
    }


def test_prometheus_scrapes_every_component_where_it_serves() -> None:
    svc = services()
    jobs = _targets(yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text()))
    expected: dict[str, set[str]] = {"dataplane": set(), "controlplane": set(), "agent": set(), "vllm": set()}
    for name, s in svc.items():
        env, package = s.get("environment", {}), component(s.get("command", []))
        if package == "dataplane":
            expected["dataplane"].add(f"{name}:{env['LORAPLANE_HTTP_PORT']}")
        elif package == "controlplane":
            expected["controlplane"].add(f"{name}:{metrics_port(env, package)}")
        elif package == "workeragent":
            expected["agent"].add(f"{name}:{metrics_port(env, package)}")
            expected["vllm"].add(f"{name}:{env['LORAPLANE_VLLM_PORT']}")
    assert jobs == expected
    # In Kubernetes, by port name: every name kept exists on the pods.
    config = yaml.safe_load(k8s("ConfigMap", "prometheus-loraplane")["data"]["prometheus.yml"])
    keep = next(
        r["regex"] for r in config["scrape_configs"][0]["relabel_configs"]
        if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"] and r.get("action") == "keep"
    )  # fmt: skip
    names = set().union(*(_port_names(w) for w in workloads() if w["metadata"]["name"] != "redis"))
    assert set(keep.split("|")) <= names and "grpc" not in keep.split("|")


def test_promtool_accepts_the_scrape_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed here (Debian package `prometheus`)")
    out = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "loraplane.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace('"$base_model"', '".*"').replace('"$worker"', '".*"')


def _nodes(ast: promql_parser.Expr) -> list[promql_parser.Expr]:
    nodes: list[promql_parser.Expr] = []
    promql_parser.walk(ast, nodes.append)
    return nodes


def _metric(name: str) -> tuple[str, str]:
    """(metric, series suffix) for a series name: a histogram's _bucket/_sum/_count included."""
    if name in METRICS:
        return name, ""
    base, _, suffix = name.rpartition("_")
    assert base in METRICS and METRICS[base][0] == HISTOGRAM and suffix in ("bucket", "sum", "count"), name
    return base, suffix


def test_dashboard_queries_parse_and_use_only_the_exported_metrics() -> None:
    used: set[str] = set()
    for title, expr in _dashboard_queries():
        try:
            ast = promql_parser.parse(_grafana_to_promql(expr))
        except ValueError as err:
            raise AssertionError(f"{title}: {expr}: {err}") from None
        nodes = _nodes(ast)
        selectors = [n for n in nodes if isinstance(n, promql_parser.VectorSelector)]
        groupings = [n for n in nodes if isinstance(n, promql_parser.AggregateExpr)]
        calls = [n for n in nodes if isinstance(n, promql_parser.Call)]
        assert selectors, f"{title}: no metric"
        labels: set[str] = set(TARGET_LABELS)
        for sel in selectors:
            assert sel.name is not None, f"{title}: a selector without a metric name"
            metric, suffix = _metric(sel.name)
            kind, own = METRICS[metric]
            assert kind != COUNTER or "rate(" in expr, f"{title}: the counter {metric} outside rate()"
            labels |= own | ({"le"} if suffix == "bucket" else set())
            used.add(metric)
            for m in sel.matchers.matchers:
                assert m.name in labels, f"{title}: {metric} has no label {m.name}"
        for agg in groupings:
            if agg.modifier is not None:
                assert set(agg.modifier.labels) <= labels, f"{title}: grouping by {agg.modifier.labels}"
        for call in calls:
            if call.func.name == "histogram_quantile":
                assert "le" in str(call), f"{title}: histogram_quantile without le"
    assert used == set(METRICS), f"metrics with no panel: {set(METRICS) - used}"


def test_dashboard_is_importable() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "loraplane.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["definition"])
            assert metric is not None and metric.group(2) in METRICS[metric.group(1)][1], v["definition"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # The panels do not overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    provisioning = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/loraplane.yml").read_text())
    grafana = services()["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"]}
    assert any(m.startswith(provisioning["providers"][0]["options"]["path"]) for m in mounted)


# --- docs/operations.md -------------------------------------------------------------------------


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", OPS_DOC.read_text(), re.S)


GRPCURL_CALL = re.compile(r"grpcurl\b(?P<args>[^|\n]*?)\$(?:CP|\{CP\})\s+\$LP\.(?P<service>\w+)/(?P<method>\w+)")


def _grpcurl_calls() -> list[tuple[str, str, str | None]]:
    """(service, method, JSON body with shell variables filled in) of every grpcurl call in the doc."""
    text = "\n".join(_blocks("sh") + _blocks("console")).replace("\\\n", " ")
    calls = []
    for m in GRPCURL_CALL.finditer(text):
        body = re.search(r"""-d\s+('([^']*)'|"((?:[^"\\]|\\.)*)")""", m.group("args"))
        raw = None
        if body:
            raw = body.group(2) if body.group(2) is not None else body.group(3).replace('\\"', '"')
            raw = re.sub(r"\$\{?\w+\}?", "x", raw)
        calls.append((m.group("service"), m.group("method"), raw))
    return calls


OPERATOR_VERBS = [
    *[(admin_pb2.DESCRIPTOR.services_by_name["AdminService"], m) for m in ("DrainWorker", "UndrainWorker",
      "ForceLoadAdapter", "ForceEvictAdapter", "GetRoutingTable", "AssignWorker", "UnassignWorker",
      "PrefetchAdapter")],
    *[(tenant_pb2.DESCRIPTOR.services_by_name["TenantService"], m.name)
      for m in tenant_pb2.DESCRIPTOR.services_by_name["TenantService"].methods],
    (worker_pb2.DESCRIPTOR.services_by_name["WorkerService"], "ListWorkers"),
]  # fmt: skip


def test_every_operator_verb_has_a_grpcurl_recipe() -> None:
    # every method of AdminService is listed above, so a new verb fails here until documented
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert {m.name for m in admin.methods} == {m for s, m in OPERATOR_VERBS if s is admin}
    documented_calls = {(s, m) for s, m, _ in _grpcurl_calls()}
    for service, method in OPERATOR_VERBS:
        assert (service.name, method) in documented_calls, f"no grpcurl recipe for {service.name}/{method}"


def test_grpcurl_recipes_match_the_served_api(sim_stack: SimStack) -> None:
    """Each recipe's method and JSON body, against what the running control plane describes
    through server reflection (what grpcurl itself relies on)."""
    with grpc.insecure_channel(sim_stack.stack.grpc_addr) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        for service, method, body in _grpcurl_calls():
            desc: MethodDescriptor = pool.FindServiceByName(f"loraplane.controlplane.v1.{service}").methods_by_name[
                method
            ]
            request = message_factory.GetMessageClass(desc.input_type)()
            json_format.Parse(body or "{}", request)  # raises on an unknown field or enum value


def test_operations_doc_runs_as_written(sim_stack: SimStack, tmp_path: Path) -> None:
    """Every `sh` block of docs/operations.md, in order, in one shell, against the embedded stack
    (its agents attached to vLLM simulators): the directory holds the stack's `.loraplane`, as
    where `bash scripts/up` runs; the test only sets CP, DP, WORKER and ADAPTER."""
    bindir = str(Path(sys.executable).parent)
    path = bindir + os.pathsep + os.environ.get("PATH", "")
    missing = [tool for tool in ("grpcurl", "jq", "curl", "loraplane") if shutil.which(tool, path=path) is None]
    if missing:
        pytest.skip(f"not installed: {missing} (the recipes' bodies are still checked by reflection above)")
    stack = sim_stack.stack
    operator = stack.operator()
    owner = operator.create_tenant("ops-doc-owner").api_key
    r = upload(stack, owner, "ops-doc", safetensors_bytes(lora_tensors(rank=4)))
    assert r.status_code == 201, r.text
    adapter, worker = r.json()["id"], "embedded-tiny-llama"
    operator.force_load(adapter, worker)
    (tmp_path / ".loraplane").symlink_to(stack.config.data_dir.resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLANE_", "TOKEN", "KEY"))}
    env |= {"PATH": path, "CP": stack.grpc_addr, "DP": stack.http_url, "WORKER": worker, "ADAPTER": adapter}
    script = "set -euo pipefail\n" + "\n".join(_blocks("sh"))
    out = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert lines.index("200") < lines.index("401"), "the new key works, then the old one is refused"
    assert f"{worker} undrained" in lines
    # The doc leaves the fleet as it found it: nothing drained, the adapter evicted, acme active.
    routing = {w.worker_id: w for w in operator.routing_table().workers}
    assert not routing[worker].draining and adapter not in routing[worker].adapter_ids
    acme = next(t for t in operator.list_tenants().tenants if t.name == "acme")
    assert not acme.suspended
