"""Build, sign and send one webhook request, and classify what happened.

No database access and no retry decisions here: the claimer owns those. The sender never
raises for an HTTP outcome; every attempt ends as a ``model.AttemptResult``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import re
import ssl
import time
from collections.abc import Callable, Mapping

import aiohttp
import yarl
from aiohttp import client_proto, client_reqrep, helpers

from dispatcher import backoff, model, signing

USER_AGENT = "dispatcher-webhooks/0.1"
_MAX_URLS = 4096
# What HTTP/1.1 allows in a field name (a token) and value (visible ASCII, space, tab and
# obs-text); aiohttp refuses the rest when the request is written.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\U0010ffff]*")


class UnsendableError(Exception):
    """This subscription's request cannot be built; the message names why, never a value."""


def header_problem(name: str, value: str) -> str | None:
    """Why HTTP would refuse this header, or None. Names the header, never its value."""
    # fullmatch: "$" would let a trailing newline through.
    if not _HEADER_NAME.fullmatch(name):
        return f"header name {name[:64]!r} is not an HTTP token"
    if not _HEADER_VALUE.fullmatch(value):
        return f"header {name!r} has a control character in its value"
    return None


def _check_headers(headers: Mapping[str, str]) -> None:
    """``UnsendableError`` naming the first header HTTP would refuse (custom or signed: an
    event id with a control character ends up in ``webhook-id``). Valid strings concatenate
    to a valid string, so the common case is two regex passes, not two per header."""
    if (
        "" not in headers
        and _HEADER_NAME.fullmatch("".join(headers))
        and _HEADER_VALUE.fullmatch("".join(headers.values()))
    ):
        return
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem is not None:
            raise UnsendableError(problem)


def unsigned_headers(custom: Mapping[str, str] | None) -> dict[str, str]:
    """Every request's headers before signing: the subscription's own (minus the reserved
    ones), the content type and the user agent."""
    headers = (
        {k: v for k, v in custom.items() if k.lower() not in model.RESERVED_HEADERS}
        if custom
        else {}
    )
    headers["content-type"] = "application/json"
    headers["user-agent"] = USER_AGENT
    return headers


class _Attempt:
    __slots__ = ("cancelling", "deadline", "done", "expired", "task")

    def __init__(self, task: asyncio.Task[object], deadline: float) -> None:
        self.task: asyncio.Task[object] | None = task
        self.deadline = deadline
        self.cancelling = task.cancelling()
        self.done = False
        self.expired = False


class Deadlines:
    """Whole-attempt deadlines, with ``asyncio.timeout``'s semantics: at the deadline the
    attempt's task is cancelled, and that cancellation (and no other) becomes ``TimeoutError``.

    One Sender's attempts all get the same timeout, so their deadlines fall in the order they
    start: a FIFO and one timer armed for its oldest running attempt serve them all. A timer
    per attempt (``asyncio.timeout``) was ~5 % of the sender's instructions (callgrind)."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._queue: collections.deque[_Attempt] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> _Attempt:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline needs a task")
        if loop is not self._loop:  # a new event loop (tests): nothing carries over
            self._queue.clear()
            self._timer = None
            self._loop = loop
        attempt = _Attempt(task, loop.time() + self._seconds)
        self._queue.append(attempt)
        if self._timer is None:
            self._timer = loop.call_at(attempt.deadline, self._expire)
        return attempt

    def finish(self, attempt: _Attempt) -> bool:
        """Ends ``attempt``; True when its deadline cancelled the task and no other
        cancellation is pending (the ``CancelledError`` then means the time ran out)."""
        attempt.done = True
        timed_out = False
        task = attempt.task
        if attempt.expired and task is not None:
            timed_out = task.uncancel() <= attempt.cancelling
        attempt.task = None
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()
        return timed_out

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        queue = self._queue
        while queue:
            head = queue[0]
            if not head.done:
                if head.deadline > now:
                    # The next running attempt's deadline (a finished head's timer fired).
                    self._timer = loop.call_at(head.deadline, self._expire)
                    return
                head.expired = True
                assert head.task is not None
                head.task.cancel()
            queue.popleft()


_NO_TIMER = helpers.TimerNoop()


def _direct_requests_fit() -> bool:
    """Whether the installed aiohttp has the connector and request API ``Sender._request``
    is written against (aiohttp 3.14's; ``tests/integration/test_sender_http.py`` fails when
    an upgrade no longer fits); otherwise every request takes the session path."""
    try:
        request = inspect.signature(client_reqrep.ClientRequest.__init__).parameters
        params = inspect.signature(client_proto.ResponseHandler.set_response_params).parameters
        connect = inspect.signature(aiohttp.BaseConnector.connect).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return (
        {"loop", "response_class", "timer", "session", "ssl", "traces"} <= request.keys()
        and {"timer", "read_until_eof", "auto_decompress"} <= params.keys()
        and {"req", "traces", "timeout"} <= connect.keys()
        and hasattr(aiohttp.BaseConnector, "allowed_protocol_schema_set")
        and all(
            hasattr(aiohttp, name)
            for name in ("ConnectionTimeoutError", "NonHttpUrlClientError", "InvalidUrlClientError")
        )
    )


# Requests go through Sender._request when the installed aiohttp fits it.
DIRECT_REQUESTS = _direct_requests_fit()


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
        direct: bool = True,
    ) -> None:
        self._session = session
        # ``direct``: requests through ``_request`` when the installed aiohttp fits it; False
        # keeps them on ClientSession's own path (which aioresponses mocks, in unit tests).
        self._direct = direct and DIRECT_REQUESTS
        self._registry = registry
        # aiohttp bounds only the connect; the attempt's deadline is kept by ``Deadlines``
        # in send(). aiohttp's own total timeout built a handle, a timer context and two
        # callbacks per request (~7 % of a delivery's CPU, py-spy).
        self._deadlines = Deadlines(request_timeout_seconds)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
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
        # Parsed URLs by subscription URL string (bounded like the SSRF guard's cache): aiohttp
        # parses a string URL on every request.
        self._urls: dict[str, yarl.URL] = {}

    def build_headers(self, job: model.Job, timestamp: int) -> dict[str, str]:
        """The request's headers; ``UnsendableError`` when the subscription cannot produce them
        (a refused header, an unusable secret, a signer that fails)."""
        headers = unsigned_headers(job.headers)
        key = (job.signature_header, job.signers)
        signers = self._signers.get(key)
        if signers is None:
            # Unknown names raise SigningError here, every time (nothing cached for them).
            try:
                signers = self._registry.for_subscription(job.signature_header, job.signers)
            except signing.SigningError as exc:
                raise UnsendableError(f"signing: {exc}") from None
            self._signers[key] = signers
        item = signing.SigningInput(
            msg_id=job.event_id,
            timestamp=timestamp,
            body=job.body,
            secrets=job.secrets,
            header_name=job.signature_header,
        )
        for signer in signers:
            try:
                signed = signer.headers(item)
            except signing.SigningError as exc:
                raise UnsendableError(f"signing: {exc}") from None
            except Exception as exc:
                # A plug-in's own error text may quote what it was given (the secret): only
                # its type is kept.
                raise UnsendableError(
                    f"signer {signer.name!r} raised {type(exc).__name__}"
                ) from None
            headers.update(signed)
        _check_headers(headers)
        if not job.headers or not any(k.lower() == "accept-encoding" for k in job.headers):
            # Said here rather than skipped through the session's skip_auto_headers, which
            # made aiohttp copy every request's headers to check them (~4 % of a delivery's
            # CPU, py-spy): responses are stored as sent, never decompressed.
            headers["accept-encoding"] = "identity"
        return headers

    async def send(
        self, job: model.Job, trace_headers: Mapping[str, str] | None = None
    ) -> model.AttemptResult:
        """``trace_headers``: the attempt span's ``traceparent``/``tracestate`` (tracing on);
        set after the subscription's custom headers, so those cannot forge them."""
        started = time.monotonic()
        try:
            if job.problem is not None:
                raise UnsendableError(job.problem)
            if self._guard is not None:
                self._guard(job.url)
            headers = self.build_headers(job, int(self._clock()))
            if trace_headers:
                headers.update(trace_headers)
            # Bounds the whole attempt, body read included (a trickling body is cut at the
            # deadline: tests/chaos).
            attempt = self._deadlines.start()
            try:
                result = await self._post(job, headers, started)
            except asyncio.CancelledError:
                if self._deadlines.finish(attempt):
                    raise TimeoutError from None
                raise
            except BaseException:
                self._deadlines.finish(attempt)
                raise
            self._deadlines.finish(attempt)
            return result
        except TimeoutError:
            return self._failure(model.Outcome.TIMEOUT, "request deadline exceeded", started)
        except aiohttp.ServerTimeoutError as exc:
            return self._failure(model.Outcome.TIMEOUT, _describe(exc), started)
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
            # Before ClientConnectorError (its parent): a certificate that fails verification
            # (wrong host, expired, unknown CA) is its own outcome, retried like a connect error.
            return self._failure(model.Outcome.TLS_ERROR, _describe_tls(exc), started)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if self._is_blocked(exc):
                return self._blocked(exc, started)
            return self._failure(model.Outcome.CONNECT_ERROR, _describe(exc), started)
        except aiohttp.ClientError as exc:
            if self._is_blocked(exc):
                return self._blocked(exc, started)
            return self._failure(model.Outcome.OTHER, _describe(exc), started)
        except UnsendableError as exc:
            return model.AttemptResult(
                verdict=model.Verdict.UNSENDABLE,
                outcome=model.Outcome.CONFIG_ERROR,
                status=None,
                error=f"cannot send: {exc}",
                duration_seconds=time.monotonic() - started,
            )
        except Exception as exc:
            if self._is_blocked(exc):
                return self._blocked(exc, started)
            raise

    def _url(self, url: str) -> yarl.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = yarl.URL(url)
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def _post(
        self, job: model.Job, headers: dict[str, str], started: float
    ) -> model.AttemptResult:
        if self._direct:
            resp = await self._request(self._url(job.url), headers, job.body)
        else:
            resp = await self._session.post(
                self._url(job.url),
                data=job.body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            )
        try:
            excerpt = await self._read_capped(resp)
            duration = time.monotonic() - started
            return classify_response(
                resp.status,
                resp.headers.get("Retry-After"),
                duration=duration,
                excerpt=excerpt,
                now=self._clock(),
            )
        finally:
            resp.release()
            await resp.wait_for_close()

    async def _request(
        self, url: yarl.URL, headers: dict[str, str], body: bytes
    ) -> aiohttp.ClientResponse:
        """One POST through the session's connector, without ``ClientSession._request``:
        what that adds for a request with no redirects, cookies, proxy, auth, traces or
        middlewares cost ~17 us a request, a sixth of a delivery's CPU (``DIRECT_REQUESTS``).
        The rest is its code: the connect timeout, the response parser's settings, closing
        on failure, OSError as ClientOSError. Like ClientSession, a POST is not repeated on
        a fresh connection when a kept-alive one turns out closed (not idempotent): the
        attempt fails as a connect error and is retried with backoff."""
        session = self._session
        connector = session.connector
        assert connector is not None
        # The session's own checks, before anything connects: a row written behind the API's
        # back can hold any URL (an ftp:// one would reach port 21 with a POST).
        if url.scheme not in connector.allowed_protocol_schema_set:
            raise aiohttp.NonHttpUrlClientError(url)
        if not url.raw_host:
            raise aiohttp.InvalidUrlClientError(url)
        req = client_reqrep.ClientRequest(
            "POST",
            url,
            headers=headers,
            data=body,
            loop=asyncio.get_running_loop(),
            response_class=aiohttp.ClientResponse,
            timer=_NO_TIMER,
            session=session,
            ssl=True,
            traces=[],
        )
        try:
            try:
                conn = await connector.connect(req, traces=[], timeout=self._timeout)
            except TimeoutError as exc:
                raise aiohttp.ConnectionTimeoutError(
                    f"Connection timeout to host {req.url}"
                ) from exc
            assert conn.protocol is not None
            conn.protocol.set_response_params(
                timer=_NO_TIMER, read_until_eof=False, auto_decompress=False
            )
            try:
                resp = await req.send(conn)
                try:
                    await resp.start(conn)
                except BaseException:
                    resp.close()
                    raise
            except BaseException:
                conn.close()
                raise
        except aiohttp.ClientError:
            raise
        except OSError as exc:
            if exc.errno is None and isinstance(exc, TimeoutError):
                raise
            raise aiohttp.ClientOSError(*exc.args) from exc
        return resp

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> str:
        """Read at most ``response_max_bytes``; a longer body closes the connection."""
        content = resp.content
        if content.is_eof():
            # The whole answer is buffered already (the usual short body framed by its
            # length, or none): taken without a read loop.
            raw = content.read_nowait(self._max_bytes)
        else:
            chunks: list[bytes] = []
            remaining = self._max_bytes
            while remaining > 0:
                chunk = await content.read(min(remaining, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
                if content.at_eof():
                    break
            raw = b"".join(chunks)
        if not content.at_eof():
            resp.close()  # not reusable: the rest of the body is still on the wire
        raw = raw[: self._log_bytes]
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


def _describe_tls(exc: BaseException) -> str:
    """The verification failure in OpenSSL's words (wrong host, expired, unknown CA...)."""
    cert_error = getattr(exc, "certificate_error", None)
    reason = getattr(cert_error, "verify_message", None)
    if reason:
        return f"TLS certificate verify failed: {reason}"[:500]
    return "TLS: " + _describe(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def tls_context() -> ssl.SSLContext:
    """Verifies the chain and the host name. Trust comes from OpenSSL's defaults, which honour
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``: that is how a private CA is trusted. Built when the
    dispatcher starts (aiohttp's own default context is made at import time, before them)."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


def build_session(
    *,
    max_connections: int,
    keepalive_seconds: float = 30.0,
    resolver: aiohttp.abc.AbstractResolver | None = None,
    tls: ssl.SSLContext | None = None,
) -> aiohttp.ClientSession:
    """The one shared client: keep-alive pool, no env proxies, no cookies, no automatic
    decompression (requests ask for ``identity``: ``Sender.build_headers``).

    The connector connects only to addresses ``resolver`` returned (the SSRF guard pins them);
    TLS still sends the URL's host as SNI and verifies the certificate against it."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=keepalive_seconds,
        ttl_dns_cache=30,
        resolver=resolver,
        ssl=tls if tls is not None else tls_context(),
    )
    return aiohttp.ClientSession(
        connector=connector,
        # One session serves every subscription: a cookie one receiver set would go out with
        # later deliveries to that host, for any subscription (tenant). None is kept.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        raise_for_status=False,
    )
