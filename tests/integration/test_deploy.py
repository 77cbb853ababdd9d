"""Checks for the deploy files: the Dockerfile, the compose stack and the Kubernetes manifests.

Each file goes through the linter or schema an operator's CI would use — ``hadolint``, the
compose specification's JSON schema (``check-jsonschema``, vendored schema, no network) and
``kubernetes-validate --strict`` — and every tool is first shown a broken file, so a tool that
silently accepts everything cannot make these tests pass. The Prometheus Operator's
PodMonitor and PrometheusRule have no schema in ``kubernetes-validate`` (it only knows the
built-in kinds and skips the rest with a warning); they are checked against strict schemas of
the CRD fields we use, with their metadata and label selectors checked against the upstream
Kubernetes schemas. Beyond schemas, the tests pin what the schemas cannot see: the files
agree with one another and with the code (ports, probes, grace periods, env var names).

No Docker (it cannot run here): ``tests/e2e/test_image_entrypoint.py`` runs the image's
commands directly. The tools install with ``pip install -e '.[dev]'``; without one these tests
skip locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher import cli, tracing
from dispatcher.cli import context
from dispatcher.cli import settings as cli_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
GRAFANA_PROVIDER = ROOT / "grafana" / "provisioning" / "dashboards" / "dispatcher.yaml"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The oldest Kubernetes the manifests promise to work on; they are also checked against the
# newest one the installed kubernetes-validate knows.
K8S_OLDEST = "1.29.0"
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
# Services/containers running the dispatcher image: their env must be the CLI's documented env.
OUR_IMAGES = {"dispatcher:local", "registry.example.com/dispatcher:0.1.0"}
# Set by the image for Python and pip, not read by the dispatcher.
RUNTIME_ENV = {
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PIP_NO_CACHE_DIR",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
}
# The bounded shutdown stages after the drain (app.Dispatcher._serve: claimer 5 s, result
# flush 10 s, background loops 5 s, span export 5 s) plus slack for the pool and the process
# to exit.
SHUTDOWN_OVERHEAD_SECONDS = 30


# -- helpers -----------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A console script from this virtualenv (or PATH); skip locally, fail in CI."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        reason = f"{name} not installed (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _module(name: str) -> Any:
    """A module from the dev tools (kubernetes-validate and its jsonschema); as ``_tool``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        reason = f"{name} not importable (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _resources() -> dict[str, dict[str, Any]]:
    """Every manifest by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in _documents(path):
            assert doc["kind"] not in found, f"two {doc['kind']} resources"
            found[doc["kind"]] = doc
    return found


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = _load(COMPOSE)
    return loaded


def _default(value: str) -> str:
    """A compose value with ``${VAR:-default}`` interpolation, as it is with VAR unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert duration, "empty duration"
    assert match, f"unsupported duration {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    """name → value (a string) or valueFrom (a dict) for a Kubernetes container."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _containers(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec["containers"]}


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(?:\s*#[^\n]*\n)*", " ", dockerfile)
    result = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def healthcheck_argv() -> list[str]:
    """The image's HEALTHCHECK command (exec form), as tests/e2e runs it."""
    (rest,) = [rest for keyword, rest in _stages()[-1] if keyword == "HEALTHCHECK"]
    command = rest[rest.index("CMD ") + 4 :]
    argv: list[str] = json.loads(command)
    return argv


# -- Dockerfile --------------------------------------------------------------------------------


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    result = _run(_tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3003"):
        assert rule in result.stdout, result.stdout


def test_hadolint_passes_the_dockerfile() -> None:
    args = [_tool("hadolint"), "--no-color"]
    config = DEPLOY / ".hadolint.yaml"
    if config.exists():
        args += ["--config", str(config)]
    result = _run(*args, str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_and_pinned() -> None:
    stages = _stages()
    assert len(stages) == 2
    bases = [stage[0][1].split() for stage in stages]
    assert [base[-1] for base in bases] == ["build", "runtime"]
    images = {base[0] for base in bases}
    assert len(images) == 1, "both stages must use the same base image"
    (image,) = images
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image


def test_dockerfile_builds_a_wheel_then_installs_it_offline() -> None:
    build, runtime = _stages()
    copied = " ".join(rest for keyword, rest in build if keyword == "COPY")
    # dispatcher/sql is a symlink into sql/: without sql/ the wheel has no migrations.
    for path in ("pyproject.toml", "README.md", "deploy/image_requirements.py", "sql/"):
        assert path in copied, path
    assert "dispatcher/" in copied
    assert any(k == "RUN" and "image_requirements.py" in rest for k, rest in build)
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in build)
    installs = [rest for keyword, rest in runtime if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert "from=build" in installs[0]
    assert "--no-index" in installs[0]
    assert not any(k == "COPY" for k, _ in runtime), "the runtime stage copies nothing"


def test_dockerfile_runs_as_a_fixed_non_root_user() -> None:
    runtime = _stages()[-1]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == ["10001:10001"]
    (created,) = [rest for keyword, rest in runtime if keyword == "RUN" and "useradd" in rest]
    assert "--uid 10001" in created
    assert "--gid 10001" in created


def test_dockerfile_entrypoint_and_healthcheck() -> None:
    runtime = dict(_stages()[-1])
    assert json.loads(runtime["ENTRYPOINT"]) == ["dispatcher"]
    assert json.loads(runtime["CMD"]) == ["run"]
    assert runtime["EXPOSE"] == "8090"
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2]
    assert "DISPATCHER_LISTEN" in argv[2]
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", runtime["HEALTHCHECK"]))
    assert _seconds(options["timeout"]) < _seconds(options["interval"])


def test_build_context_filter_keeps_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything else stays out of the context"
    for path in ("pyproject.toml", "README.md", "deploy/image_requirements.py", "sql/"):
        assert f"!{path}" in rules, path
    assert "!dispatcher/" in rules


# -- compose -----------------------------------------------------------------------------------


def test_compose_schema_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  web:\n    image: x:1\n    stop_grace_periodx: 10s\n")
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0
    assert "stop_grace_periodx" in result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification() -> None:
    result = _run(
        _tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_has_the_whole_stack() -> None:
    services = _compose()["services"]
    assert set(services) == {
        "postgres",
        "migrate",
        "dispatcher",
        "agent",
        "receiver",
        "prometheus",
        "grafana",
        "otel-collector",
        "tempo",
    }
    for name in ("migrate", "dispatcher", "agent", "receiver"):
        assert services[name]["image"] == "dispatcher:local", name
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (ROOT / "deploy" / "Dockerfile").exists()
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["dispatcher"]["command"] == ["run"]
    assert services["agent"]["command"] == ["agent", "--migrate"]
    receiver = services["receiver"]
    assert receiver["entrypoint"] == ["python", "-m", "dispatcher.examples.receiver"]
    assert receiver["command"][:2] == ["--listen", "0.0.0.0:9000"]
    for name in ("dispatcher", "agent"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_compose_images_are_tagged() -> None:
    for name, service in _compose()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert tag not in {"", "latest"}, f"{name}: {image}"


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_dispatcher_is_reachable_and_guarded() -> None:
    compose = _compose()
    services = compose["services"]
    env = services["dispatcher"]["environment"]
    host, port = env["DISPATCHER_LISTEN"].rsplit(":", 1)
    assert host == "0.0.0.0"
    # A non-loopback admin port needs a token (the admin API refuses to start without one).
    assert _default(env["DISPATCHER_ADMIN_TOKEN"]).strip()
    assert f"127.0.0.1:{port}:{port}" in services["dispatcher"]["ports"]
    prometheus = _load(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "dispatcher"]
    assert job["static_configs"][0]["targets"] == [f"dispatcher:{port}"]
    assert "backend" in services["dispatcher"]["networks"]
    assert "backend" in services["prometheus"]["networks"]


def test_compose_ssrf_allow_list_is_exactly_the_receivers_network() -> None:
    compose = _compose()
    services = compose["services"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["receivers"]["ipam"]["config"]]
    allowed = services["dispatcher"]["environment"]["DISPATCHER_ALLOW_CIDRS"]
    assert allowed == subnet, "one knob (RECEIVER_SUBNET) must set both"
    # The agent checks callback URLs against the same policy before accepting a job.
    assert services["agent"]["environment"]["DISPATCHER_ALLOW_CIDRS"] == subnet
    ctx = context.Context.from_env({"DISPATCHER_ALLOW_CIDRS": _default(allowed)})
    assert ctx.values["DISPATCHER_ALLOW_CIDRS"]
    ctx.address_policy()  # parses
    assert services["receiver"]["networks"] == ["receivers"]
    on_receivers = {n for n, s in services.items() if "receivers" in s.get("networks", [])}
    assert on_receivers == {"dispatcher", "receiver"}


def test_compose_receiver_verifies_with_the_agents_secret() -> None:
    services = _compose()["services"]
    secret = services["agent"]["environment"]["AGENT_WEBHOOK_SECRET"]
    command = services["receiver"]["command"]
    assert command[command.index("--secret") + 1] == secret
    from dispatcher import signing

    signing.validate_secret(_default(secret))


def test_compose_stop_grace_outlasts_the_drain() -> None:
    dispatcher = _compose()["services"]["dispatcher"]
    grace = float(
        dispatcher["environment"].get(
            "DISPATCHER_SHUTDOWN_GRACE", cli_settings.ENVIRONMENT["DISPATCHER_SHUTDOWN_GRACE"][0]
        )
    )
    stop = _seconds(dispatcher["stop_grace_period"])
    assert stop >= grace + 20, (stop, grace)


# -- OpenTelemetry Collector -------------------------------------------------------------------

COLLECTOR_CONFIG = DEPLOY / "otel-collector.yaml"
# What the core distribution (otel/opentelemetry-collector) is built with, of the kinds the
# file may use; the contrib-only ones would make the core image refuse the file.
CORE_COMPONENTS = {
    "receivers": {"otlp", "nop"},
    "processors": {"batch", "memory_limiter"},
    "exporters": {"debug", "otlp", "otlphttp", "nop"},
    "extensions": {"zpages"},
}
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")


def collector_problems(config: Any) -> list[str]:
    """What the collector would refuse at start (or silently ignore) in a config file."""
    if not isinstance(config, dict):
        return ["not a mapping"]
    problems = []
    top = {"receivers", "processors", "exporters", "extensions", "connectors", "service"}
    problems += [f"unknown top-level key {k!r}" for k in set(config) - top]
    defined: dict[str, set[str]] = {}
    for kind in ("receivers", "processors", "exporters", "extensions"):
        section = config.get(kind) or {}
        if not isinstance(section, dict):
            problems.append(f"{kind} is not a mapping")
            continue
        defined[kind] = set(section)
        for name, settings in section.items():
            component = name.split("/", 1)[0]
            if component not in CORE_COMPONENTS[kind]:
                problems.append(f"{kind}: {component!r} is not in the core distribution")
            if settings is not None and not isinstance(settings, dict):
                problems.append(f"{kind}.{name} settings are not a mapping")
    service = config.get("service")
    if not isinstance(service, dict) or not isinstance(service.get("pipelines"), dict):
        return [*problems, "service.pipelines missing"]
    used: dict[str, set[str]] = {kind: set() for kind in defined}
    used["extensions"] = set(service.get("extensions") or [])
    for pipeline, spec in service["pipelines"].items():
        signal = pipeline.split("/", 1)[0]
        if signal not in {"traces", "metrics", "logs"}:
            problems.append(f"pipeline {pipeline!r} is not traces, metrics or logs")
        extra = set(spec) - {"receivers", "processors", "exporters"}
        problems += [f"pipeline {pipeline}: unknown key {k!r}" for k in sorted(extra)]
        for kind in ("receivers", "exporters"):
            if not spec.get(kind):
                problems.append(f"pipeline {pipeline} has no {kind}")
        for kind in ("receivers", "processors", "exporters"):
            for name in spec.get(kind) or []:
                used[kind].add(name)
                if name not in defined.get(kind, set()):
                    problems.append(f"pipeline {pipeline}: {kind[:-1]} {name!r} is not defined")
        processors = [p.split("/", 1)[0] for p in spec.get("processors") or []]
        if "memory_limiter" in processors and processors[0] != "memory_limiter":
            problems.append(f"pipeline {pipeline}: memory_limiter must come first")
    for kind, names in defined.items():
        problems += [f"{kind[:-1]} {n!r} is defined but unused" for n in sorted(names - used[kind])]

    def durations(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"timeout", "check_interval", "interval"} and not (
                    isinstance(value, str) and GO_DURATION.match(value)
                ):
                    problems.append(f"{path}{key}: {value!r} is not a Go duration")
                durations(value, f"{path}{key}.")

    durations(config, "")
    return problems


def test_collector_check_rejects_a_broken_config() -> None:
    broken = {
        "receivers": {"otlp": {}, "kafka": {}},
        "processors": {"batch": {"timeout": 2}, "memory_limiter": {"check_interval": "1s"}},
        "exporters": {"debug": {}},
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch", "memory_limiter"],
                    "exporters": ["debug", "jaeger"],
                }
            }
        },
    }
    problems = collector_problems(broken)
    assert "receivers: 'kafka' is not in the core distribution" in problems
    assert "receiver 'kafka' is defined but unused" in problems
    assert "processors.batch.timeout: 2 is not a Go duration" in problems
    assert "pipeline traces: exporter 'jaeger' is not defined" in problems
    assert "pipeline traces: memory_limiter must come first" in problems
    assert collector_problems({"service": {}}) == ["service.pipelines missing"]


def test_collector_config_is_valid_and_receives_the_dispatchers_traces() -> None:
    config = _load(COLLECTOR_CONFIG)
    assert collector_problems(config) == []
    services = _compose()["services"]
    collector = services["otel-collector"]
    image, _, tag = collector["image"].rpartition(":")
    assert image == "otel/opentelemetry-collector", "core components only: the core image"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), tag
    (flag,) = collector["command"]
    target = flag.removeprefix("--config=")
    mounts = dict(v.split(":")[:2] for v in collector["volumes"])
    assert mounts["./otel-collector.yaml"] == target
    assert "ports" not in collector, "only the stack's own containers export to it"
    # The dispatcher exports to the collector's OTLP/HTTP receiver, on a shared network.
    dispatcher = services["dispatcher"]
    endpoint = dispatcher["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert tracing_settings(endpoint).endpoint == endpoint + "/v1/traces"
    host_port = endpoint.removeprefix("http://")
    host, _, port = host_port.partition(":")
    assert host == "otel-collector"
    listen = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert listen == f"0.0.0.0:{port}"
    assert "traces" in config["service"]["pipelines"]
    assert set(collector["networks"]) & set(dispatcher["networks"])
    assert "otel-collector" in dispatcher["depends_on"]


def test_traces_flow_on_to_tempo_and_grafana_links_exemplars_to_them() -> None:
    services = _compose()["services"]
    collector_config = _load(COLLECTOR_CONFIG)
    tempo_service = services["tempo"]
    image, _, tag = tempo_service["image"].rpartition(":")
    assert image == "grafana/tempo"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), tag
    (flag,) = tempo_service["command"]
    mounts = dict(v.split(":")[:2] for v in tempo_service["volumes"])
    assert mounts["./tempo.yaml"] == flag.removeprefix("-config.file=")
    tempo = _load(DEPLOY / "tempo.yaml")
    assert set(tempo) <= {
        "stream_over_http_enabled",
        "server",
        "distributor",
        "storage",
        "compactor",
        "ingester",
    }
    # The collector's exporter reaches Tempo's OTLP/HTTP receiver on a shared network.
    exporter = collector_config["exporters"]["otlphttp/tempo"]["endpoint"]
    host, port = exporter.removeprefix("http://").split(":")
    assert host == "tempo"
    listen = tempo["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert listen == f"0.0.0.0:{port}"
    assert set(tempo_service["networks"]) & set(services["otel-collector"]["networks"])
    assert "otlphttp/tempo" in collector_config["service"]["pipelines"]["traces"]["exporters"]
    storage = tempo["storage"]["trace"]
    assert storage["backend"] == "local"
    # The image runs as a non-root user and no volume is mounted there: /tmp is writable.
    assert storage["local"]["path"].startswith("/tmp/")
    assert storage["wal"]["path"].startswith("/tmp/")
    # Grafana: the Tempo datasource points at Tempo's HTTP port; Prometheus exemplars link
    # their trace_id label (what the dispatcher attaches) to it by uid.
    provisioning = ROOT / "grafana" / "provisioning" / "datasources"
    (tempo_ds,) = _load(provisioning / "tempo.yaml")["datasources"]
    assert tempo_ds["url"] == f"http://tempo:{tempo['server']['http_listen_port']}"
    assert tempo_ds["type"] == "tempo"
    (prometheus_ds,) = _load(provisioning / "prometheus.yaml")["datasources"]
    (link,) = prometheus_ds["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == tracing.EXEMPLAR_TRACE_ID
    assert link["datasourceUid"] == tempo_ds["uid"]
    assert tempo_ds["jsonData"]["tracesToMetrics"]["datasourceUid"] == prometheus_ds["uid"]
    assert "tempo" in services["grafana"]["depends_on"]
    # …and the end-to-end latency panel asks for the exemplars, on both dashboards.
    for name in ("overview.json", "subscription.json"):
        dashboard = json.loads((ROOT / "grafana" / "dashboards" / name).read_text())
        (panel,) = [p for p in dashboard["panels"] if p["title"] == "End-to-end latency"]
        assert all(t.get("exemplar") is True for t in panel["targets"]), name
        assert all("dispatcher_delivery_latency_seconds" in t["expr"] for t in panel["targets"])


def tracing_settings(endpoint: str) -> Any:
    settings = tracing.settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert settings is not None
    return settings


def test_compose_prometheus_keeps_exemplars() -> None:
    prometheus = _compose()["services"]["prometheus"]
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    # Overriding the command drops the image's defaults: the config path must be given back.
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_compose_mounts_the_shipped_observability_files() -> None:
    services = _compose()["services"]
    # Short syntax: SOURCE:TARGET[:MODE].
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1] for v in s.get("volumes", [])}
        for name, s in services.items()
    }
    prometheus = mounts["prometheus"]
    assert prometheus["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # rule_files is relative to the config file, so the rules must sit beside it.
    assert prometheus["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert _load(DEPLOY / "prometheus" / "prometheus.yml")["rule_files"] == ["alerts.yml"]
    grafana = mounts["grafana"]
    assert grafana["../grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = _load(GRAFANA_PROVIDER)["providers"][0]
    assert grafana["../grafana/dashboards"] == provider["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    for name, volumes in mounts.items():
        for source in volumes:
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    assert (ROOT / "grafana" / "dashboards" / Path(home).name).exists()


# -- Kubernetes --------------------------------------------------------------------------------


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path) -> None:
    deployment = _resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(bad))
    assert result.returncode != 0
    assert "terminationGracePeriodSecond" in result.stdout


def test_kubernetes_validate_strict_passes_every_manifest() -> None:
    """Built-in kinds must pass on every version; only the two CRDs may be skipped, and those
    are checked by the CRD schema test below."""
    newest = _module("kubernetes_validate.utils").latest_version()
    versions = ["-k", K8S_OLDEST, "-k", newest]
    result = _run(_tool("kubernetes-validate"), "--strict", *versions, *map(str, MANIFESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = set()
    for line in result.stdout.splitlines():
        level, _, rest = line.partition(" ")
        if level == "INFO":
            passed.add(re.search(r"resource (\S+)", rest).group(1))  # type: ignore[union-attr]
        else:
            assert level == "WARN", line
            kind = re.search(r"kind (\S+) with api version", rest)
            assert kind, line
            assert kind.group(1) in CRD_KINDS, line
    expected = {
        f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for path in MANIFESTS
        for doc in _documents(path)
        if doc["kind"] not in CRD_KINDS
    }
    assert passed == expected


def _k8s_validator(type_file: str) -> Any:
    """A validator for one built-in Kubernetes type from kubernetes-validate's strict schemas."""
    kv = _module("kubernetes_validate.utils")
    jsonschema = _module("jsonschema")
    referencing = _module("referencing")
    version = kv.latest_version()
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{folder}/{type_file}", version)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


# Strict JSON schemas of the Prometheus Operator CRD fields (monitoring.coreos.com/v1) these
# manifests use, written from the operator's API reference. A field outside them fails the
# test: extend the schema (from the CRD) when a manifest starts using one. metadata and label
# selectors are checked separately against the upstream Kubernetes schemas.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {
            "enum": [
                *(a for p in ("replace", "keep", "drop", "hashmod") for a in (p, p.title())),
                *("labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep"),
                *("lowercase", "Lowercase", "uppercase", "Uppercase"),
                *("keepequal", "KeepEqual", "dropequal", "DropEqual"),
            ]
        },
        "modulus": {"type": "integer"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "targetLabel": {"type": "string"},
    },
}
_CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector"],
                "properties": {
                    "selector": {"type": "object"},
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "portNumber": {"type": "integer", "minimum": 1},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": _RELABEL},
                                "metricRelabelings": {"type": "array", "items": _RELABEL},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "query_offset": _DURATION,
                                "limit": {"type": "integer"},
                                "labels": _STRING_MAP,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRING_MAP,
                                            "annotations": _STRING_MAP,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def _crd_errors(resource: dict[str, Any]) -> list[str]:
    validator = _module("jsonschema").Draft202012Validator(_CRD_SCHEMAS[resource["kind"]])
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(resource)
    ]
    metadata = _k8s_validator("objectmeta-meta-v1.json")
    errors += [f"metadata: {e.message}" for e in metadata.iter_errors(resource["metadata"])]
    if "selector" in resource["spec"]:
        selector = _k8s_validator("labelselector-meta-v1.json")
        errors += [
            f"spec.selector: {e.message}"
            for e in selector.iter_errors(resource["spec"]["selector"])
        ]
    return errors


def test_crd_schemas_reject_broken_resources() -> None:
    resources = _resources()
    monitor = json.loads(json.dumps(resources["PodMonitor"]))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    monitor["spec"]["selector"]["matchLabel"] = {}
    rule = json.loads(json.dumps(resources["PrometheusRule"]))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
    rule["metadata"]["labelz"] = {}
    assert len(_crd_errors(monitor)) == 2, _crd_errors(monitor)
    assert len(_crd_errors(rule)) == 2, _crd_errors(rule)


@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_crd_resources_match_their_schemas(kind: str) -> None:
    assert _crd_errors(_resources()[kind]) == []


def test_prometheusrule_is_generated_from_alerts_yml() -> None:
    result = _run(sys.executable, str(K8S / "generate_rules.py"), "--check")
    assert result.returncode == 0, result.stderr
    rule = _resources()["PrometheusRule"]
    assert rule["spec"] == _load(ALERTS), "PrometheusRule.spec must equal alerts.yml"


def test_podmonitor_scrapes_the_sidecar_as_job_dispatcher() -> None:
    resources = _resources()
    monitor = resources["PodMonitor"]["spec"]
    pod = resources["Deployment"]["spec"]["template"]
    selector = monitor["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    ports = _containers(pod["spec"])["dispatcher"]["ports"]
    assert endpoint["port"] in {p["name"] for p in ports}
    # The alert rules select job="dispatcher"; the operator's default job name would not match.
    assert 'up{job="dispatcher"}' in ALERTS.read_text(encoding="utf-8")
    assert {"action": "replace", "targetLabel": "job", "replacement": "dispatcher"} in endpoint[
        "relabelings"
    ]
    scrape = _load(DEPLOY / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    assert endpoint["interval"] == scrape


def test_sidecar_deployment() -> None:
    resources = _resources()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    containers = _containers(pod)
    assert set(containers) == {"agent", "dispatcher"}
    dispatcher = containers["dispatcher"]
    assert dispatcher["args"] == ["run"]
    assert containers["agent"]["args"] == ["agent", "--migrate"]
    env = _env(dispatcher)
    host, port = env["DISPATCHER_LISTEN"].rsplit(":", 1)
    (admin,) = [p for p in dispatcher["ports"] if p["name"] == "admin"]
    assert admin["containerPort"] == int(port)
    # Probes come from the kubelet on the pod IP: a loopback-only listener would fail them,
    # and listening beyond loopback needs the admin token.
    assert host == "0.0.0.0"
    assert env["DISPATCHER_ADMIN_TOKEN"]["secretKeyRef"]["key"] == "DISPATCHER_ADMIN_TOKEN"
    assert dispatcher["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert dispatcher["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    agent = containers["agent"]
    _, agent_port = _env(agent)["AGENT_LISTEN"].rsplit(":", 1)
    assert agent["ports"] == [{"name": "http", "containerPort": int(agent_port), "protocol": "TCP"}]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    grace = float(env["DISPATCHER_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= grace + SHUTDOWN_OVERHEAD_SECONDS
    # The admin port is in no Service.
    service = resources["Service"]["spec"]
    assert {p["targetPort"] for p in service["ports"]} == {"http"}
    assert (
        service["selector"].items()
        <= resources["Deployment"]["spec"]["selector"]["matchLabels"].items()
    )


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_are_hardened_and_sized(kind: str) -> None:
    pod = _resources()[kind]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001, "the uid the Dockerfile creates"
    for container in pod["containers"]:
        name = container["name"]
        assert container["image"] in OUR_IMAGES, name
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name


def test_migration_job_uses_the_deployments_image() -> None:
    resources = _resources()
    job = resources["Job"]["spec"]
    (migrate,) = job["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    assert job["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    images = {c["image"] for c in resources["Deployment"]["spec"]["template"]["spec"]["containers"]}
    assert images == {migrate["image"]}


def test_secret_references_resolve() -> None:
    resources = _resources()
    secret = resources["Secret"]
    keys = set(secret["stringData"])
    for kind in ("Deployment", "Job"):
        for container in resources[kind]["spec"]["template"]["spec"]["containers"]:
            for value in _env(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    ref = value["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in keys, ref
    # Every process that reads or writes subscription secrets must hold the same keys.
    containers = _containers(resources["Deployment"]["spec"]["template"]["spec"])
    keys_from = [_env(c).get("DISPATCHER_SECRET_KEYS") for c in containers.values()]
    assert keys_from[0] is not None
    assert all(k == keys_from[0] for k in keys_from), keys_from
    compose = _compose()["services"]
    assert (
        compose["dispatcher"]["environment"]["DISPATCHER_SECRET_KEYS"]
        == compose["agent"]["environment"]["DISPATCHER_SECRET_KEYS"]
    )
    # Placeholders must not look usable.
    assert all("CHANGE_ME" in value for value in secret["stringData"].values())


def test_networkpolicy_names_real_ports() -> None:
    resources = _resources()
    pod = resources["Deployment"]["spec"]["template"]
    policy = resources["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    used = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert used == names


# -- env vars ----------------------------------------------------------------------------------


def _deploy_env_names() -> dict[str, set[str]]:
    """Env var names the deploy files set or mention for the dispatcher image, by file."""
    found: dict[str, set[str]] = {}
    mention = re.compile(r"\b(?:DISPATCHER|AGENT)_[A-Z0-9_]+\b|\bDATABASE_URL\b")
    for path in [DOCKERFILE, COMPOSE, *MANIFESTS]:
        found[path.name] = set(mention.findall(path.read_text(encoding="utf-8")))
    for service in _compose()["services"].values():
        if service["image"] in OUR_IMAGES:
            found[COMPOSE.name] |= set(service.get("environment", {}))
    for kind, resource in _resources().items():
        if kind in {"Deployment", "Job"}:
            for container in resource["spec"]["template"]["spec"]["containers"]:
                found[kind] = found.get(kind, set()) | set(_env(container))
        if kind == "Secret":
            found[kind] = set(resource["stringData"])
    runtime_env = " ".join(rest for keyword, rest in _stages()[-1] if keyword == "ENV")
    found[DOCKERFILE.name] |= set(re.findall(r"([A-Z][A-Z0-9_]*)=", runtime_env)) - RUNTIME_ENV
    return found


def test_env_vars_in_deploy_files_are_documented_by_the_cli() -> None:
    undocumented = {
        name: sorted(names - set(cli_settings.ENVIRONMENT))
        for name, names in _deploy_env_names().items()
        if names - set(cli_settings.ENVIRONMENT)
    }
    assert undocumented == {}, (
        "add them to the table in dispatcher.cli.settings or fix the deploy file"
    )


def test_env_var_scan_sees_the_files() -> None:
    names = _deploy_env_names()
    assert {"DATABASE_URL", "DISPATCHER_LISTEN", "DISPATCHER_ADMIN_TOKEN"} <= names["Deployment"]
    assert {"DISPATCHER_LISTEN", "DISPATCHER_LOG_FORMAT"} <= names["Dockerfile"]
    assert {"DISPATCHER_ALLOW_CIDRS", "AGENT_WEBHOOK_SECRET"} <= names["compose.yaml"]


def _subcommands() -> set[str]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_commands_the_deploy_files_run_exist() -> None:
    """Every subcommand the deploy files run (or tell the reader to run) is a real one."""
    used = {json.loads(dict(_stages()[-1])["CMD"])[0]}
    for service in _compose()["services"].values():
        if service["image"] in OUR_IMAGES and "entrypoint" not in service:
            used.add(service["command"][0])
    for kind in ("Deployment", "Job"):
        for container in _resources()[kind]["spec"]["template"]["spec"]["containers"]:
            used.add(container["args"][0])
    text = "\n".join(p.read_text(encoding="utf-8") for p in [DOCKERFILE, COMPOSE, *MANIFESTS])
    used |= set(re.findall(r"docker run IMAGE (\w+)", text))
    assert used >= {"run", "migrate", "agent"}
    assert used - _subcommands() == set(), "not `dispatcher` subcommands"
    (receiver,) = [s for s in _compose()["services"].values() if "entrypoint" in s]
    assert importlib.util.find_spec(receiver["entrypoint"][2]) is not None


def test_paths_named_in_comments_exist() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in [DOCKERFILE, COMPOSE, *MANIFESTS])
    paths = set(re.findall(r"\b(deploy/[\w./-]+\.(?:ya?ml|py)|deploy/Dockerfile)\b", text))
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), path
    job = _resources()["Job"]["metadata"]["name"]
    assert f"job/{job}" in (K8S / "migrate-job.yaml").read_text(encoding="utf-8")
