"""OpenTelemetry traces from the producer's transaction to the receiver.

The only module that imports ``opentelemetry``, and only inside functions: with tracing off
(no OTLP endpoint configured, ``OTEL_SDK_DISABLED``, or the ``tracing`` extra not installed)
callers hold ``OFF``, whose methods return at once, and nothing of OpenTelemetry is loaded.

What it records when on (a ``Tracing`` built by the composition root):

* an attempt span per HTTP attempt (kind CLIENT, HTTP semantic conventions plus ``webhook.*``)
  as a child of the event's stored ``traceparent``: retries are siblings under that parent; a
  manual retry or replay starts a new trace linked to the original context;
* a ``webhook.route`` span per routing batch, linking the traced events it routed;
* the ``traceparent``/``tracestate`` headers of the attempt span, for the request.

For the receiving side, ``continued()`` runs the receiver toolkit's handler in a server span
under the receiving application's own (global) tracer provider.

It must not read ``os.environ`` (the CLI hands it the environment), must never put a secret,
a signature, a header value or a body on a span, and a malformed stored trace context only
means a new trace: nothing here may fail or delay a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dispatcher import config, model

if TYPE_CHECKING:
    from opentelemetry import trace as trace_api
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace import export as sdk_export

log = structlog.get_logger("dispatcher.tracing")

# W3C Trace Context, version 00 (and the first four fields of a later version).
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE_MAX_CHARS = 512
_TRACESTATE_RE = re.compile(r"[\x20-\x7e]*")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
SERVICE_NAME = "dispatcher"
# Remembered redacted URLs (per subscription URL), bounded like the SSRF guard's cache.
_URL_CACHE_MAX = 4096
SHUTDOWN_TIMEOUT_SECONDS = 5.0
# Exemplar label names: Grafana's exemplar links (grafana/provisioning) look for trace_id.
EXEMPLAR_TRACE_ID = "trace_id"
EXEMPLAR_SPAN_ID = "span_id"


# -- W3C values ------------------------------------------------------------------------------


def parse_traceparent(value: str | None) -> str | None:
    """A valid ``traceparent`` normalised to version 00, or None for anything else (absent,
    malformed, all-zero ids, version ff): the caller starts a new trace then."""
    if not value:
        return None
    text = value.strip()
    match = _TRACEPARENT_RE.match(text)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    rest = text[match.end() :]
    # Version 00 is exactly four fields; a later version may append more after a dash.
    if (version == "00" and rest) or (rest and not rest.startswith("-")):
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def clean_tracestate(value: str | None) -> str | None:
    """``tracestate`` kept only when it is plausible (printable ASCII, at most 512 chars)."""
    if not value:
        return None
    text = value.strip()
    if not text or len(text) > _TRACESTATE_MAX_CHARS or not _TRACESTATE_RE.fullmatch(text):
        return None
    return text


def current_context() -> tuple[str | None, str | None]:
    """The active span's (``traceparent``, ``tracestate``) in this process, for ``publish``.

    (None, None) without an active valid span, and at no cost when the application never
    imported OpenTelemetry (then no span can be active)."""
    if "opentelemetry.trace" not in sys.modules:
        return None, None
    from opentelemetry import trace  # noqa: PLC0415

    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None, None
    return _header(span_context), span_context.trace_state.to_header() or None


def _header(span_context: trace_api.SpanContext) -> str:
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags) & 0xFF:02x}"
    )


def _remote_context(traceparent: str | None, tracestate: str | None) -> Any:
    """The SpanContext a stored value names, or None when it is absent or malformed."""
    normal = parse_traceparent(traceparent)
    if normal is None:
        return None
    from opentelemetry import trace  # noqa: PLC0415

    _, trace_id, span_id, flags = normal.split("-")
    state = clean_tracestate(tracestate)
    return trace.SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16)),
        trace_state=trace.TraceState.from_header([state]) if state else trace.TraceState(),
    )


def safe_url(url: str) -> tuple[str, str | None, int | None]:
    """(``url.full`` without userinfo and with query values redacted, host, port): a
    subscription URL may carry a token in either place."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        return "REDACTED", None, None
    netloc = host or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    query = "&".join(
        f"{key}=REDACTED" for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, "")), host, port


# -- configuration ---------------------------------------------------------------------------


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def settings_from_env(env: Mapping[str, str]) -> config.TracingSettings | None:
    """Tracing settings, or None when tracing is off (no endpoint, or the SDK disabled).

    Raises ``config.ConfigError`` for a value the dispatcher cannot honour, before anything
    starts (a gRPC protocol, an unknown sampler, a ratio outside [0, 1])."""

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    if _true(get("OTEL_SDK_DISABLED")):
        return None
    endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint is None:
        base = get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if base is None:
            return None
        endpoint = base.rstrip("/") + "/v1/traces"
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https") or "://" not in endpoint:
        raise config.ConfigError(f"OTLP traces endpoint {endpoint!r} is not an http(s) URL")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = get(name)
        if protocol is not None and protocol != "http/protobuf":
            raise config.ConfigError(f"{name}={protocol!r}: only http/protobuf is supported")
        if protocol is not None:
            break
    sampler = (get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    if sampler not in SAMPLERS:
        raise config.ConfigError(
            f"OTEL_TRACES_SAMPLER={sampler!r} is not one of {', '.join(SAMPLERS)}"
        )
    ratio = 1.0
    raw_ratio = get("OTEL_TRACES_SAMPLER_ARG")
    if raw_ratio is not None and sampler.endswith("traceidratio"):
        try:
            ratio = float(raw_ratio)
        except ValueError:
            raise config.ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={raw_ratio!r} is not a number"
            ) from None
        if not 0.0 <= ratio <= 1.0:
            raise config.ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw_ratio!r} is outside [0, 1]")
    delay_seconds = 5.0
    raw_delay = get("OTEL_BSP_SCHEDULE_DELAY")
    if raw_delay is not None:
        try:
            delay_seconds = float(raw_delay) / 1000.0
        except ValueError:
            raise config.ConfigError(
                f"OTEL_BSP_SCHEDULE_DELAY={raw_delay!r} is not a number"
            ) from None
        if delay_seconds <= 0:
            raise config.ConfigError("OTEL_BSP_SCHEDULE_DELAY must be > 0 (milliseconds)")
    return config.TracingSettings(
        endpoint=endpoint,
        service_name=get("OTEL_SERVICE_NAME") or SERVICE_NAME,
        sampler=sampler,
        sampler_ratio=ratio,
        export_delay_seconds=delay_seconds,
    )


def installed() -> bool:
    """Whether the ``tracing`` extra (the SDK and the OTLP/HTTP exporter) is importable."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
        )
    except ModuleNotFoundError:
        return False


# -- what the data path holds ----------------------------------------------------------------


class Attempt(Protocol):
    """One attempt's span as the claimer sees it."""

    @property
    def headers(self) -> Mapping[str, str] | None:
        """Headers for the request (traceparent, tracestate); None with tracing off."""

    def finish(self, result: model.AttemptResult, state: str) -> None: ...

    def exemplar(self) -> dict[str, str] | None: ...


class Tracer(Protocol):
    enabled: bool

    def attempt(self, job: Any) -> Attempt: ...

    def routed(
        self, started_ns: int, ended_ns: int, counts: Mapping[str, int], traced: Sequence[Any]
    ) -> None: ...

    async def shutdown(self) -> None: ...


class _NoAttempt:
    headers: Mapping[str, str] | None = None

    def finish(self, result: model.AttemptResult, state: str) -> None:
        return

    def exemplar(self) -> dict[str, str] | None:
        return None


_NO_ATTEMPT = _NoAttempt()


class Off:
    """Tracing off: every method returns at once."""

    enabled = False

    def attempt(self, job: Any) -> Attempt:
        return _NO_ATTEMPT

    def routed(
        self, started_ns: int, ended_ns: int, counts: Mapping[str, int], traced: Sequence[Any]
    ) -> None:
        return

    async def shutdown(self) -> None:
        return


OFF = Off()


class _Attempt:
    __slots__ = ("_span", "headers")

    def __init__(self, span: trace_api.Span, headers: Mapping[str, str]) -> None:
        self._span = span
        self.headers: Mapping[str, str] | None = headers

    def finish(self, result: model.AttemptResult, state: str) -> None:
        try:
            self._finish(result, state)
        except Exception as exc:  # telemetry trouble is logged, never the delivery's
            log.error("trace_finish_failed", error=type(exc).__name__)

    def _finish(self, result: model.AttemptResult, state: str) -> None:
        span = self._span
        if span.is_recording():
            status = result.status
            attributes: dict[str, Any] = {
                "webhook.outcome": result.outcome.value,
                "webhook.state": str(state),
            }
            if status is not None:
                attributes["http.response.status_code"] = status
            if result.verdict is not model.Verdict.DELIVERED:
                from opentelemetry import trace  # noqa: PLC0415

                # The status code for an HTTP answer, else the outcome label (timeout,
                # connect_error, blocked, other). Never the error text: it may quote a URL.
                attributes["error.type"] = (
                    str(status) if status is not None else result.outcome.value
                )
                span.set_status(trace.StatusCode.ERROR)
            span.set_attributes(attributes)  # one call: each takes the span's lock
        span.end()

    def exemplar(self) -> dict[str, str] | None:
        span_context = self._span.get_span_context()
        if not span_context.trace_flags.sampled:
            return None  # an unsampled trace is never exported: nothing to jump to
        return {
            EXEMPLAR_TRACE_ID: f"{span_context.trace_id:032x}",
            EXEMPLAR_SPAN_ID: f"{span_context.span_id:016x}",
        }


class Tracing:
    """Tracing on: an SDK ``TracerProvider`` of its own (never the process-global one, so an
    application embedding the dispatcher keeps its own), exporting over OTLP/HTTP in batches
    from the SDK's worker thread."""

    enabled = True

    def __init__(
        self,
        settings: config.TracingSettings,
        *,
        version: str,
        exporter: sdk_export.SpanExporter | None = None,
    ) -> None:
        from opentelemetry import context, trace  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.http import trace_exporter  # noqa: PLC0415
        from opentelemetry.sdk import resources  # noqa: PLC0415
        from opentelemetry.sdk import trace as sdk  # noqa: PLC0415
        from opentelemetry.sdk.trace import export  # noqa: PLC0415

        self._trace = trace
        self._context = context
        resource = resources.Resource.create(
            {"service.name": settings.service_name, "service.version": version}
        )
        self.provider: sdk_trace.TracerProvider = sdk.TracerProvider(
            resource=resource, sampler=_sampler(settings)
        )
        self.provider.add_span_processor(
            export.BatchSpanProcessor(
                exporter or trace_exporter.OTLPSpanExporter(endpoint=settings.endpoint),
                schedule_delay_millis=settings.export_delay_seconds * 1000,
            )
        )
        self._tracer = self.provider.get_tracer("dispatcher", version)
        self._client = trace.SpanKind.CLIENT
        self._internal = trace.SpanKind.INTERNAL
        self._urls: dict[str, tuple[str, str | None, int | None]] = {}

    # -- attempts --------------------------------------------------------------------------

    def attempt(self, job: Any) -> Attempt:
        """The attempt's span (``_NO_ATTEMPT`` if OpenTelemetry fails: the request goes out
        untraced rather than not at all)."""
        try:
            return self._attempt(job)
        except Exception as exc:  # telemetry trouble is logged, never the delivery's
            log.error("trace_attempt_failed", error=type(exc).__name__)
            return _NO_ATTEMPT

    def _attempt(self, job: Any) -> Attempt:
        origin = _remote_context(job.traceparent, job.tracestate)
        trace = self._trace
        links: list[trace_api.Link] = []
        parent = self._context.Context()
        if origin is not None:
            if job.manual:
                # An operator's retry or replay, possibly days later: its own trace, linked to
                # the one the event was published in.
                links.append(trace.Link(origin, {"webhook.link": "replay_of"}))
            else:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(origin), parent)
        url = self._urls.get(job.url)
        if url is None:
            if len(self._urls) >= _URL_CACHE_MAX:
                self._urls.clear()
            url = self._urls[job.url] = safe_url(job.url)
        full, host, port = url
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "url.full": full,
            "webhook.event_id": job.event_id,
            "webhook.event_type": job.event_type,
            "webhook.subscription": job.subscription_id,
            "webhook.delivery_id": job.delivery_id,
            "webhook.attempt": job.attempt,
        }
        if job.manual:
            attributes["webhook.manual"] = True
        if host is not None:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        span = self._tracer.start_span(
            "POST", context=parent, kind=self._client, attributes=attributes, links=links
        )
        span_context = span.get_span_context()
        headers = {"traceparent": _header(span_context)}
        state = span_context.trace_state.to_header()
        if state:
            headers["tracestate"] = state
        return _Attempt(span, headers)

    # -- routing ---------------------------------------------------------------------------

    def routed(
        self, started_ns: int, ended_ns: int, counts: Mapping[str, int], traced: Sequence[Any]
    ) -> None:
        """One span for a routing batch, linking the traced events it routed (``traced``:
        (traceparent, tracestate) pairs; the SDK keeps the first 128 links)."""
        try:
            self._routed(started_ns, ended_ns, counts, traced)
        except Exception as exc:  # telemetry trouble is logged, never the router's
            log.error("trace_route_failed", error=type(exc).__name__)

    def _routed(
        self, started_ns: int, ended_ns: int, counts: Mapping[str, int], traced: Sequence[Any]
    ) -> None:
        links = []
        for traceparent, tracestate in traced:
            origin = _remote_context(traceparent, tracestate)
            if origin is not None:
                links.append(self._trace.Link(origin))
        span = self._tracer.start_span(
            "webhook.route",
            context=self._context.Context(),
            kind=self._internal,
            attributes={f"webhook.route.{name}": value for name, value in counts.items()},
            links=links,
            start_time=started_ns,
        )
        span.end(end_time=ended_ns)

    # -- lifecycle -------------------------------------------------------------------------

    async def flush(self, timeout_seconds: float = SHUTDOWN_TIMEOUT_SECONDS) -> bool:
        """Export what has ended so far (tests, and the last step before shutdown)."""
        return await asyncio.to_thread(self.provider.force_flush, int(timeout_seconds * 1000))

    async def shutdown(self) -> None:
        """Export what is left, bounded: an unreachable collector must not hold up the exit.

        The SDK's shutdown retries a dead collector for up to 30 s; it runs in a daemon thread
        (an executor thread would be joined at interpreter exit) that is left behind after
        ``SHUTDOWN_TIMEOUT_SECONDS``."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone by now
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, SHUTDOWN_TIMEOUT_SECONDS)


def _sampler(settings: config.TracingSettings) -> Any:
    from opentelemetry.sdk.trace import sampling  # noqa: PLC0415

    ratio = sampling.TraceIdRatioBased(settings.sampler_ratio)
    root = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": ratio,
    }
    name = settings.sampler
    if name.startswith("parentbased_"):
        return sampling.ParentBased(root[name.removeprefix("parentbased_")])
    return root[name]


def start(
    settings: config.TracingSettings | None,
    *,
    version: str,
) -> Tracer:
    """``Tracing`` when configured and installed, else ``OFF`` (with a warning when an
    endpoint is configured but the extra is missing: tracing is never worth a failed start)."""
    if settings is None:
        return OFF
    if not installed():
        log.warning(
            "tracing_unavailable",
            reason="opentelemetry is not installed",
            hint="pip install 'dispatcher[tracing]'",
        )
        return OFF
    tracer = Tracing(settings, version=version)
    log.info(
        "tracing_enabled",
        endpoint=safe_url(settings.endpoint)[0],
        service=settings.service_name,
        sampler=settings.sampler,
    )
    return tracer


# -- the receiving side ----------------------------------------------------------------------

_RECEIVER_OTEL: list[bool] = []


@contextlib.contextmanager
def continued(headers: Mapping[str, str], name: str) -> Iterator[Any]:
    """Run a request handler inside a SERVER span continuing the request's ``traceparent``,
    using the application's own (global) tracer provider. Yields the span, or None when the
    request carries no trace context or OpenTelemetry is not installed."""
    if "traceparent" not in headers:
        yield None
        return
    if not _RECEIVER_OTEL:
        _RECEIVER_OTEL.append(importlib.util.find_spec("opentelemetry") is not None)
    if not _RECEIVER_OTEL[0]:
        yield None
        return
    from opentelemetry import context, trace  # noqa: PLC0415

    origin = _remote_context(headers.get("traceparent"), headers.get("tracestate"))
    parent = context.Context()
    if origin is not None:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(origin), parent)
    tracer = trace.get_tracer("dispatcher.receiver")
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": "POST"},
    ) as span:
        yield span
