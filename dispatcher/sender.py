"""Build, sign and send one webhook request, and classify what happened.

No database access and no retry decisions here: the claimer owns those. The sender never
raises for an HTTP outcome; every attempt ends as a ``model.AttemptResult``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import aiohttp

from dispatcher import backoff, model, signing

USER_AGENT = "dispatcher-webhooks/0.1"


class Sender:
    """Sends jobs over one shared ``aiohttp.ClientSession`` (keep-alive, no redirects).

    ``guard`` is called with the URL before every attempt and raises to refuse it (the SSRF
    guard plugs in there); ``is_blocked`` recognises the guard's refusals inside aiohttp's
    connection model."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        registry: signing.SignerRegistry,
        *,
        request_timeout_seconds: float,
        connect_timeout_seconds: float,
        response_max_bytes: int,
        response_log_bytes: int,
        guard: Callable[[str], None] | None = None,
        is_blocked: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._registry = registry
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_seconds,
            connect=connect_timeout_seconds,
            sock_connect=connect_timeout_seconds,
        )
        self._max_bytes = response_max_bytes
        self._log_bytes = response_log_bytes
        self._guard = guard
        self._is_blocked = is_blocked or (lambda _exc: False)
        self._clock = clock
        # Signer tuples by (signature header, extra signer names): the registry lookup built
        # a list and a tuple per attempt (bench profile).
        self._signers: dict[tuple[str | None, tuple[str, ...]], tuple[signing.Signer, ...]] = {}

    def build_headers(self, job: model.Job, timestamp: int) -> dict[str, str]:
        headers = (
            {k: v for k, v in job.headers.items() if k.lower() not in model.RESERVED_HEADERS}
            if job.headers
            else {}
        )
        headers["content-type"] = "application/json"
        headers["user-agent"] = USER_AGENT
        key = (job.signature_header, job.signers)
        signers = self._signers.get(key)
        if signers is None:
            # Unknown names raise SigningError here, every time (nothing cached for them).
            signers = self._registry.for_subscription(job.signature_header, job.signers)
            self._signers[key] = signers
        item = signing.SigningInput(
            msg_id=job.event_id,
            timestamp=timestamp,
            body=job.body,
            secrets=job.secrets,
            header_name=job.signature_header,
        )
        headers.update(signing.sign(signers, item))
        return headers

    async def send(
        self, job: model.Job, trace_headers: Mapping[str, str] | None = None
    ) -> model.AttemptResult:
        """``trace_headers``: the attempt span's ``traceparent``/``tracestate`` (tracing on);
        set after the subscription's custom headers, so those cannot forge them."""
        started = time.monotonic()
        try:
            if self._guard is not None:
                self._guard(job.url)
            headers = self.build_headers(job, int(self._clock()))
            if trace_headers:
                headers.update(trace_headers)
            # ClientTimeout(total=…) bounds the whole attempt, body read included (a trickling
            # body is cut at the deadline: tests/chaos); a second asyncio.timeout cost ~3 % CPU.
            return await self._post(job, headers, started)
        except TimeoutError:
            return self._failure(model.Outcome.TIMEOUT, "request deadline exceeded", started)
        except aiohttp.ServerTimeoutError as exc:
            return self._failure(model.Outcome.TIMEOUT, _describe(exc), started)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if self._is_blocked(exc):
                return self._blocked(exc, started)
            return self._failure(model.Outcome.CONNECT_ERROR, _describe(exc), started)
        except aiohttp.ClientError as exc:
            if self._is_blocked(exc):
                return self._blocked(exc, started)
            return self._failure(model.Outcome.OTHER, _describe(exc), started)
        except signing.SigningError as exc:
            return model.AttemptResult(
                verdict=model.Verdict.PERMANENT,
                outcome=model.Outcome.OTHER,
                status=None,
                error=f"signing: {exc}",
                duration_seconds=time.monotonic() - started,
            )
        except Exception as exc:
            if self._is_blocked(exc):
                return self._blocked(exc, started)
            raise

    async def _post(
        self, job: model.Job, headers: dict[str, str], started: float
    ) -> model.AttemptResult:
        async with self._session.post(
            job.url,
            data=job.body,
            headers=headers,
            allow_redirects=False,
            timeout=self._timeout,
        ) as resp:
            excerpt = await self._read_capped(resp)
            duration = time.monotonic() - started
            return classify_response(
                resp.status,
                resp.headers.get("Retry-After"),
                duration=duration,
                excerpt=excerpt,
                now=self._clock(),
            )

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> str:
        """Read at most ``response_max_bytes``; a longer body closes the connection."""
        chunks: list[bytes] = []
        remaining = self._max_bytes
        while remaining > 0:
            chunk = await resp.content.read(min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0 and not resp.content.at_eof():
            resp.close()  # not reusable: the rest of the body is still on the wire
        raw = b"".join(chunks)[: self._log_bytes]
        # Postgres text cannot hold NUL: one binary answer (a gzip bomb, say) would otherwise
        # make the whole ack batch fail on every retry (found by tests/chaos).
        return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")

    @staticmethod
    def _failure(outcome: model.Outcome, error: str, started: float) -> model.AttemptResult:
        return model.AttemptResult(
            verdict=model.Verdict.RETRYABLE,
            outcome=outcome,
            status=None,
            error=error,
            duration_seconds=time.monotonic() - started,
        )

    @staticmethod
    def _blocked(exc: BaseException, started: float) -> model.AttemptResult:
        return model.AttemptResult(
            verdict=model.Verdict.BLOCKED,
            outcome=model.Outcome.BLOCKED,
            status=None,
            error=f"blocked: {_describe(exc)}",
            duration_seconds=time.monotonic() - started,
        )


def classify_response(
    status: int,
    retry_after: str | None,
    *,
    duration: float,
    excerpt: str | None = None,
    now: float,
) -> model.AttemptResult:
    """HTTP status → verdict and metric outcome."""
    outcome: model.Outcome
    verdict: model.Verdict
    wait: float | None = None
    if 200 <= status < 300:
        verdict, outcome = model.Verdict.DELIVERED, model.Outcome.SUCCESS
    elif status == 410:
        verdict, outcome = model.Verdict.GONE, model.Outcome.HTTP_4XX
    elif status == 429:
        verdict, outcome = model.Verdict.RETRYABLE, model.Outcome.HTTP_429
        wait = backoff.parse_retry_after(retry_after, now=now)
    elif status == 408:
        verdict, outcome = model.Verdict.RETRYABLE, model.Outcome.HTTP_4XX
    elif 500 <= status < 600:
        verdict, outcome = model.Verdict.RETRYABLE, model.Outcome.HTTP_5XX
        wait = backoff.parse_retry_after(retry_after, now=now)
    elif 400 <= status < 500:
        verdict, outcome = model.Verdict.PERMANENT, model.Outcome.HTTP_4XX
    else:  # 1xx/3xx: redirects are never followed and count as failures
        verdict, outcome = model.Verdict.PERMANENT, model.Outcome.OTHER
    error = None if verdict is model.Verdict.DELIVERED else f"HTTP {status}"
    return model.AttemptResult(
        verdict=verdict,
        outcome=outcome,
        status=status,
        error=error,
        duration_seconds=duration,
        retry_after_seconds=wait,
        response_excerpt=excerpt,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def build_session(
    *,
    max_connections: int,
    keepalive_seconds: float = 30.0,
    resolver: aiohttp.abc.AbstractResolver | None = None,
) -> aiohttp.ClientSession:
    """The one shared client: keep-alive pool, no env proxies, no automatic decompression."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=keepalive_seconds,
        ttl_dns_cache=30,
        resolver=resolver,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        auto_decompress=False,
        raise_for_status=False,
        skip_auto_headers=("Accept-Encoding",),
    )
