"""Tracing's pure parts: W3C value parsing, OpenTelemetry's environment variables, URL
redaction, and the promise that tracing off loads nothing of OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dispatcher import config, tracing
from dispatcher.cli import settings as cli_settings
from tests import support

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, VALID),
        (f"  {VALID} ", VALID),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03", VALID[:-2] + "03"),
        # A later version: the first four fields count, the rest is ignored.
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever", VALID),
        (None, None),
        ("", None),
        ("garbage", None),
        (VALID + "-extra", None),  # version 00 has exactly four fields
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        (VALID.upper(), None),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
    ],
)
def test_parse_traceparent(value: str | None, expected: str | None) -> None:
    assert tracing.parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (" a=1 ", "a=1"),
        ("", None),
        (None, None),
        ("a=" + "x" * 600, None),
        ("caf\u00e9=1", None),
        ("a=1\nb=2", None),
    ],
)
def test_clean_tracestate(value: str | None, expected: str | None) -> None:
    assert tracing.clean_tracestate(value) == expected


def test_safe_url_drops_userinfo_and_query_values() -> None:
    full, host, port = tracing.safe_url("https://bob:hunter2@hooks.example.com/in?token=abc&x=")
    assert full == "https://hooks.example.com/in?token=REDACTED&x=REDACTED"
    assert (host, port) == ("hooks.example.com", 443)
    full, host, port = tracing.safe_url("http://[::1]:8080/h#frag")
    assert (full, host, port) == ("http://[::1]:8080/h", "::1", 8080)
    assert tracing.safe_url("http://host:notaport/")[0] == "REDACTED"


def test_tracing_is_off_without_an_endpoint() -> None:
    assert tracing.settings_from_env({}) is None
    assert tracing.settings_from_env({"OTEL_SERVICE_NAME": "x"}) is None
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing.settings_from_env({**on, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.settings_from_env({**on, "OTEL_SDK_DISABLED": "TRUE"}) is None
    assert tracing.settings_from_env({**on, "OTEL_SDK_DISABLED": "false"}) is not None


def test_settings_follow_opentelemetrys_variables() -> None:
    base = tracing.settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert base == config.TracingSettings(endpoint="http://collector:4318/v1/traces")
    assert base.service_name == "dispatcher"
    full = tracing.settings_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otlp.example.com/custom/traces",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "webhooks",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_BSP_SCHEDULE_DELAY": "250",
        }
    )
    assert full == config.TracingSettings(
        endpoint="https://otlp.example.com/custom/traces",
        service_name="webhooks",
        sampler="parentbased_traceidratio",
        sampler_ratio=0.25,
        export_delay_seconds=0.25,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "only http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "only http/protobuf"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "is not one of"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, "not a number"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "outside"),
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "must be > 0"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318"}, "not an http(s) URL"),
    ],
)
def test_settings_refuse_what_cannot_be_honoured(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tracing.settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", **env})


def test_every_variable_read_is_in_the_cli_table() -> None:
    read = {
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_SDK_DISABLED",
    }
    source = (support.ROOT / "dispatcher" / "tracing.py").read_text()
    assert {name for name in read if f'"{name}"' in source} == read
    assert {k for k in cli_settings.ENVIRONMENT if k.startswith("OTEL_")} == read


def test_start_without_settings_is_off() -> None:
    assert tracing.start(None, version="0") is tracing.OFF
    attempt = tracing.OFF.attempt(object())
    assert attempt.headers is None
    assert attempt.exemplar() is None


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    """The data path with tracing off: publish's context lookup, the claimer, router, app and
    receiver toolkit are imported and used without loading opentelemetry."""
    code = """
import sys
from dispatcher import app, claimer, producer, receiver, router, tracing
assert tracing.current_context() == (None, None)
assert tracing.start(tracing.settings_from_env({}), version="0") is tracing.OFF
with tracing.continued({"webhook-id": "x"}, "n") as span:
    assert span is None
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=support.ROOT, timeout=60)


def test_the_cli_refuses_a_grpc_exporter_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher", "run"],
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            # Never connected to: the settings are refused first.
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        },
        capture_output=True,
        text=True,
        cwd=support.ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dispatcher: error: OTEL_EXPORTER_OTLP_PROTOCOL='grpc': only http/protobuf is supported"
    ]


def test_an_opentelemetry_failure_never_costs_the_delivery() -> None:
    """A job the SDK chokes on goes out untraced; a result it chokes on is only logged."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer = tracing.Tracing(
        config.TracingSettings(endpoint="http://127.0.0.1:9/v1/traces"),
        version="0",
        exporter=exporter,
    )
    broken = tracer.attempt(object())  # no delivery_id, url, …
    assert broken.headers is None
    assert broken.exemplar() is None

    class Job:
        delivery_id = 1
        url = "http://127.0.0.1:8080/hook"
        event_id = "evt_1"
        event_type = "order.paid"
        subscription_id = "sub"
        attempt = 1
        manual = False
        traceparent = None
        tracestate = None

    attempt = tracer.attempt(Job())
    assert attempt.headers is not None
    assert attempt.headers["traceparent"].startswith("00-")
    attempt.finish(None, "delivered")  # type: ignore[arg-type]
    tracer.routed(0, 1, {"events": 1}, [("not a traceparent", None), None])
    tracer.provider.shutdown()
