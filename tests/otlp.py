"""A real OTLP/HTTP traces endpoint on 127.0.0.1 for the tests.

An aiohttp server that accepts ``POST /v1/traces`` with an ``ExportTraceServiceRequest``
(protobuf, as the dispatcher's exporter sends it), decodes it with ``opentelemetry-proto`` and
keeps every span and every raw request body, so tests can look for spans and for leaks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gzip
import signal
import sys
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from tests import support


@dataclasses.dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int  # the proto enum: 2 SERVER, 3 CLIENT, 1 INTERNAL
    attributes: dict[str, Any]
    links: tuple[Link, ...]
    status_code: int  # 0 unset, 1 ok, 2 error

    def is_parent_in(self, traceparent: str) -> bool:
        """Whether a ``traceparent`` header names this span (any flags, sampled set)."""
        ids, _, flags = traceparent.rpartition("-")
        return ids == f"00-{self.trace_id}-{self.span_id}" and bool(int(flags, 16) & 1)


CLIENT = 3
INTERNAL = 1


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


class Collector:
    """``url`` is what ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` should be."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.bodies: list[bytes] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> Collector:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers.get("Content-Type") == "application/x-protobuf"
        self.bodies.append(body)
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name"))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            service=service,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes=_attributes(s.attributes),
                            links=tuple(
                                Link(
                                    link.trace_id.hex(),
                                    link.span_id.hex(),
                                    _attributes(link.attributes),
                                )
                                for link in s.links
                            ),
                            status_code=s.status.code,
                        )
                    )
        response = trace_service_pb2.ExportTraceServiceResponse()
        return web.Response(
            body=response.SerializeToString(), content_type="application/x-protobuf"
        )

    def attempts(self, event_id: str | None = None) -> list[Span]:
        """Attempt spans (optionally of one event), in attempt order."""
        found = [
            s
            for s in self.spans
            if s.kind == CLIENT
            and (event_id is None or s.attributes.get("webhook.event_id") == event_id)
        ]
        return sorted(found, key=lambda s: s.attributes["webhook.attempt"])

    def routes(self) -> list[Span]:
        return [s for s in self.spans if s.name == "webhook.route"]

    async def wait_attempts(self, event_id: str, count: int, timeout: float = 15.0) -> list[Span]:
        await support.wait_for(
            lambda: len(self.attempts(event_id)) >= count,
            timeout=timeout,
            message=f"{count} attempt span(s) of {event_id}",
        )
        return self.attempts(event_id)


async def _serve(port: int) -> None:
    """Run a collector on 127.0.0.1:``port`` until interrupted, then print what it received."""
    collector = await Collector().start(port)
    print(f"OTLP/HTTP traces endpoint on {collector.url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        names = dict(collections.Counter(s.name for s in collector.spans))
        print(f"{len(collector.spans)} spans in {len(collector.bodies)} exports: {names}")
        await collector.stop()


if __name__ == "__main__":
    # For `dispatcher bench` with tracing on: python -m tests.otlp [PORT]; stop with SIGTERM.
    asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 4318))
