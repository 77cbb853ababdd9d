"""The ``dispatcher`` command line. The only module that reads ``os.environ``.

Every subcommand resolves the database the same way: ``DATABASE_URL`` when set, otherwise an
embedded Postgres under ``DISPATCHER_PGDATA`` (default ``.dispatcher/pgdata``), started on
demand and stopped when the command exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from dispatcher import config, logs, secretbox, ssrf, tracing
from dispatcher.db import migrate

# Every environment variable the CLI reads: name → (default, meaning). The README's
# configuration table and the deploy files are checked against this list.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "DATABASE_URL": (
        "(embedded)",
        "Postgres DSN; unset = embedded Postgres under DISPATCHER_PGDATA",
    ),
    "DISPATCHER_PGDATA": (".dispatcher/pgdata", "data directory of the embedded Postgres"),
    "DISPATCHER_LISTEN": ("127.0.0.1:8090", "admin API, /metrics, /healthz, /readyz"),
    "DISPATCHER_WORKER_ID": ("<hostname>-<pid>", "name recorded on leases and attempts"),
    "DISPATCHER_MAX_IN_FLIGHT": ("256", "requests on the wire per process, all subscriptions"),
    "DISPATCHER_CLAIM_BATCH": ("200", "most deliveries claimed per statement"),
    "DISPATCHER_POLL_INTERVAL": ("1.0", "seconds between polls when no NOTIFY arrives"),
    "DISPATCHER_CONNECT_TIMEOUT": ("3", "seconds to establish a connection to a receiver"),
    "DISPATCHER_REQUEST_TIMEOUT": ("10", "total seconds for one attempt, body read included"),
    "DISPATCHER_LEASE_MARGIN": ("30", "seconds a lease outlives the request timeout"),
    "DISPATCHER_SHUTDOWN_GRACE": ("20", "seconds SIGTERM waits for requests on the wire"),
    "DISPATCHER_RETRY_BASE": ("5", "first retry delay ceiling, seconds (full jitter)"),
    "DISPATCHER_RETRY_CAP": ("21600", "largest retry delay, seconds"),
    "DISPATCHER_MAX_ATTEMPTS": ("30", "attempts before a delivery is dead"),
    "DISPATCHER_MAX_AGE": ("259200", "seconds after the event after which retries stop"),
    "DISPATCHER_MAX_4XX_ATTEMPTS": ("3", "attempts for 4xx answers other than 408/410/429"),
    "DISPATCHER_RETRY_AFTER_MAX": ("3600", "largest Retry-After honoured, seconds"),
    "DISPATCHER_METRICS_MAX_SUBSCRIPTIONS": (
        "100",
        "subscriptions labelled individually in metrics",
    ),
    "DISPATCHER_GAUGE_INTERVAL": ("5", "seconds between refreshes of the database gauges"),
    "DISPATCHER_ADMIN_TOKEN": (
        "",
        "bearer token for the /v1 admin API; required unless DISPATCHER_LISTEN is loopback "
        "(unset on loopback: /v1 answers 503)",
    ),
    "DISPATCHER_OPEN_ENDPOINTS": (
        "healthz,readyz,metrics",
        "which of these answer without the admin token (the others require it)",
    ),
    "DISPATCHER_ALLOW_CIDRS": (
        "",
        "comma-separated CIDRs the SSRF guard lets through (e.g. 127.0.0.1/32)",
    ),
    "DISPATCHER_HTTPS_ONLY": ("false", "refuse http:// subscription URLs"),
    "DISPATCHER_SECRET_KEYS": (
        "",
        "subscription secrets at rest: kid:base64key[,kid:base64key…], first seals "
        "(AES-256-GCM); empty = plaintext",
    ),
    "DISPATCHER_DISABLE_AFTER": (
        "432000",
        "seconds a subscription may fail continuously before it is disabled (0 = never)",
    ),
    "DISPATCHER_BREAKER_RATIO": (
        "0.5",
        "circuit breaker: failed share of recent attempts that pauses a subscription (0 = off)",
    ),
    "DISPATCHER_BREAKER_MIN_ATTEMPTS": ("10", "circuit breaker: attempts needed to judge"),
    "DISPATCHER_BREAKER_WINDOW": ("60", "circuit breaker: seconds of attempts considered"),
    "DISPATCHER_BREAKER_PAUSE": ("30", "first pause, seconds; doubles per failed probe"),
    "DISPATCHER_BREAKER_MAX_PAUSE": ("900", "longest pause, seconds"),
    "DISPATCHER_HEALTH_INTERVAL": ("1.0", "seconds between endpoint-health passes"),
    "DISPATCHER_RETENTION": (
        "604800",
        "seconds delivered deliveries and finished events are kept (0 = forever)",
    ),
    "DISPATCHER_ATTEMPT_RETENTION": ("2592000", "seconds attempt rows are kept (0 = forever)"),
    "DISPATCHER_RETENTION_BATCH": ("500", "rows per retention batch"),
    "DISPATCHER_RETENTION_INTERVAL": ("60", "seconds between retention passes"),
    "DISPATCHER_LOG_LEVEL": ("info", "debug, info, warning, error"),
    "DISPATCHER_LOG_FORMAT": ("auto", "json, console, or auto (console on a terminal)"),
    # OpenTelemetry's own variables (dispatcher/tracing.py); tracing is off without an endpoint.
    "OTEL_EXPORTER_OTLP_ENDPOINT": (
        "",
        "OpenTelemetry collector base URL (OTLP/HTTP; /v1/traces is appended); empty = tracing off",
    ),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("", "full OTLP/HTTP traces URL; wins over the base"),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("http/protobuf", "the only protocol supported"),
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": ("http/protobuf", "the same, for traces only"),
    "OTEL_SERVICE_NAME": ("dispatcher", "service.name on every span"),
    "OTEL_TRACES_SAMPLER": (
        "parentbased_always_on",
        "always_on, always_off, traceidratio or parentbased_* of those",
    ),
    "OTEL_TRACES_SAMPLER_ARG": ("1.0", "sampled share for the traceidratio samplers"),
    "OTEL_BSP_SCHEDULE_DELAY": ("5000", "milliseconds between span exports"),
    "OTEL_SDK_DISABLED": ("false", "true: no tracing, whatever else is set"),
    "AGENT_LISTEN": ("127.0.0.1:8000", "`dispatcher agent`: the lead-qualification API"),
    "AGENT_WEBHOOK_SECRET": (
        "(required)",
        "`dispatcher agent`: signs every callback (whsec_… recommended); keep it stable",
    ),
    "AGENT_API_KEY": ("", "`dispatcher agent`: bearer token the /api/v1 endpoints require"),
    "AGENT_MAX_PROSPECTS": ("100", "`dispatcher agent`: most prospects in one job"),
    "AGENT_MAX_BODY_BYTES": ("262144", "`dispatcher agent`: largest request body accepted"),
    "AGENT_STEP_DELAY": ("0.4", "`dispatcher agent`: seconds of pause before each job step"),
    "AGENT_CONCURRENCY": ("4", "`dispatcher agent`: jobs one agent process runs at once"),
    "AGENT_POLL_INTERVAL": ("1.0", "`dispatcher agent`: seconds between scans for jobs"),
}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value not in (None, "") else None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _env(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise CliError(f"{name}={raw!r} is not a number") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _env(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise CliError(f"{name}={raw!r} is not a whole number") from None


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = (_env(env, name) or "false").lower()
    if raw not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
        raise CliError(f"{name}={raw!r} is not a boolean (true/false)")
    return raw in {"1", "true", "yes", "on"}


def allow_cidrs(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _env(env, "DISPATCHER_ALLOW_CIDRS") or ""
    return tuple(c.strip() for c in raw.split(",") if c.strip())


def address_policy(env: Mapping[str, str]) -> ssrf.AddressPolicy:
    try:
        return ssrf.AddressPolicy.from_strings(
            allow_cidrs(env), _bool(env, "DISPATCHER_HTTPS_ONLY")
        )
    except ValueError as exc:
        raise CliError(f"DISPATCHER_ALLOW_CIDRS: {exc}") from None


def secret_box(env: Mapping[str, str]) -> secretbox.SecretBox:
    try:
        return secretbox.SecretBox.from_spec(_env(env, "DISPATCHER_SECRET_KEYS") or "")
    except secretbox.SecretBoxError as exc:
        raise CliError(f"DISPATCHER_SECRET_KEYS: {exc}") from None


def health_from_env(env: Mapping[str, str]) -> config.HealthPolicy:
    h = config.HealthPolicy()
    return config.HealthPolicy(
        disable_after_seconds=_float(env, "DISPATCHER_DISABLE_AFTER", h.disable_after_seconds),
        breaker_failure_ratio=_float(env, "DISPATCHER_BREAKER_RATIO", h.breaker_failure_ratio),
        breaker_min_attempts=_int(env, "DISPATCHER_BREAKER_MIN_ATTEMPTS", h.breaker_min_attempts),
        breaker_window_seconds=_float(env, "DISPATCHER_BREAKER_WINDOW", h.breaker_window_seconds),
        pause_seconds=_float(env, "DISPATCHER_BREAKER_PAUSE", h.pause_seconds),
        max_pause_seconds=_float(env, "DISPATCHER_BREAKER_MAX_PAUSE", h.max_pause_seconds),
        interval_seconds=_float(env, "DISPATCHER_HEALTH_INTERVAL", h.interval_seconds),
    )


def retention_from_env(env: Mapping[str, str]) -> config.RetentionPolicy:
    r = config.RetentionPolicy()
    return config.RetentionPolicy(
        delivered_seconds=_float(env, "DISPATCHER_RETENTION", r.delivered_seconds),
        attempts_seconds=_float(env, "DISPATCHER_ATTEMPT_RETENTION", r.attempts_seconds),
        batch=_int(env, "DISPATCHER_RETENTION_BATCH", r.batch),
        interval_seconds=_float(env, "DISPATCHER_RETENTION_INTERVAL", r.interval_seconds),
    )


def settings_from_env(env: Mapping[str, str], database_url: str) -> config.Settings:
    host, port = config.parse_listen(_env(env, "DISPATCHER_LISTEN") or "127.0.0.1:8090")
    d = config.Settings()
    r = config.RetryPolicy()
    secret_box(env)  # validated here, so a bad key is a CLI error before anything starts
    try:
        retry = config.RetryPolicy(
            base_seconds=_float(env, "DISPATCHER_RETRY_BASE", r.base_seconds),
            cap_seconds=_float(env, "DISPATCHER_RETRY_CAP", r.cap_seconds),
            max_attempts=_int(env, "DISPATCHER_MAX_ATTEMPTS", r.max_attempts),
            max_age_seconds=_float(env, "DISPATCHER_MAX_AGE", r.max_age_seconds),
            max_4xx_attempts=_int(env, "DISPATCHER_MAX_4XX_ATTEMPTS", r.max_4xx_attempts),
            retry_after_max_seconds=_float(
                env, "DISPATCHER_RETRY_AFTER_MAX", r.retry_after_max_seconds
            ),
        )
        return config.Settings(
            database_url=database_url,
            listen_host=host,
            listen_port=port,
            worker_id=_env(env, "DISPATCHER_WORKER_ID") or d.worker_id,
            max_in_flight=_int(env, "DISPATCHER_MAX_IN_FLIGHT", d.max_in_flight),
            claim_batch=_int(env, "DISPATCHER_CLAIM_BATCH", d.claim_batch),
            poll_interval_seconds=_float(env, "DISPATCHER_POLL_INTERVAL", d.poll_interval_seconds),
            connect_timeout_seconds=_float(
                env, "DISPATCHER_CONNECT_TIMEOUT", d.connect_timeout_seconds
            ),
            request_timeout_seconds=_float(
                env, "DISPATCHER_REQUEST_TIMEOUT", d.request_timeout_seconds
            ),
            lease_margin_seconds=_float(env, "DISPATCHER_LEASE_MARGIN", d.lease_margin_seconds),
            shutdown_grace_seconds=_float(
                env, "DISPATCHER_SHUTDOWN_GRACE", d.shutdown_grace_seconds
            ),
            retry=retry,
            metrics_max_subscriptions=_int(
                env, "DISPATCHER_METRICS_MAX_SUBSCRIPTIONS", d.metrics_max_subscriptions
            ),
            gauge_interval_seconds=_float(
                env, "DISPATCHER_GAUGE_INTERVAL", d.gauge_interval_seconds
            ),
            admin_token=_env(env, "DISPATCHER_ADMIN_TOKEN") or "",
            open_endpoints=tuple(
                e.strip()
                for e in (
                    env.get("DISPATCHER_OPEN_ENDPOINTS", "healthz,readyz,metrics") or ""
                ).split(",")
                if e.strip()
            ),
            allow_cidrs=allow_cidrs(env),
            https_only=_bool(env, "DISPATCHER_HTTPS_ONLY"),
            secret_keys=_env(env, "DISPATCHER_SECRET_KEYS") or "",
            health=health_from_env(env),
            retention=retention_from_env(env),
            tracing=tracing.settings_from_env(env),
        )
    except config.ConfigError as exc:
        raise CliError(str(exc)) from None


@contextlib.contextmanager
def database(env: Mapping[str, str]) -> Iterator[str]:
    """DATABASE_URL, or an embedded Postgres for the duration of the command."""
    url = _env(env, "DATABASE_URL")
    if url:
        yield url
        return
    from dispatcher.db import embedded  # noqa: PLC0415 (pgserver only when needed)

    server = embedded.EmbeddedPostgres(
        Path(_env(env, "DISPATCHER_PGDATA") or embedded.DEFAULT_DATA_DIR)
    )
    try:
        dsn = server.start()
    except Exception as exc:
        raise CliError(f"could not start the embedded Postgres: {exc}") from exc
    try:
        yield dsn
    finally:
        server.stop()


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# -- subcommands -------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from dispatcher import app  # noqa: PLC0415

    with database(env) as dsn:
        applied = _run(app.migrate_database(dsn))
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: drain and stop. Second: exit at once (leases expire and the
    work is picked up again, so nothing is lost)."""
    loop = asyncio.get_running_loop()
    seen = {"count": 0}

    def handle() -> None:
        seen["count"] += 1
        if seen["count"] > 1:
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle)


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from dispatcher import app  # noqa: PLC0415

    with database(env) as dsn:
        settings = settings_from_env(env, dsn)
        if args.migrate:
            _run(app.migrate_database(dsn))

        async def main() -> None:
            stop = asyncio.Event()
            install_signal_handlers(stop)
            await app.Dispatcher(settings).run(stop)

        try:
            _run(main())
        except migrate.SchemaNotReady as exc:
            raise CliError(str(exc)) from None
    return 0


def cmd_subscriptions_add(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from dispatcher import signing  # noqa: PLC0415

    secret = args.secret or signing.generate_secret()
    try:
        signing.validate_secret(secret)
    except signing.SigningError as exc:
        raise CliError(f"--secret: {exc}") from None
    try:
        ssrf.check_url(args.url, address_policy(env))
    except (ssrf.InvalidUrlError, ssrf.BlockedAddressError) as exc:
        raise CliError(f"--url: {exc}") from None
    if args.max_in_flight < 1:
        raise CliError("--max-in-flight must be at least 1")
    box = secret_box(env)

    async def main(dsn: str) -> dict[str, Any]:
        from dispatcher.db import pool as db_pool  # noqa: PLC0415
        from dispatcher.db import repository  # noqa: PLC0415

        pool = await db_pool.create_pool(
            dsn, min_size=1, max_size=1, application_name="dispatcher-cli"
        )
        try:
            return await repository.Repository(pool, box=box).create_subscription(
                url=args.url,
                event_types=args.event_type,
                secret=secret,
                signature_header=args.signature_header,
                max_in_flight=args.max_in_flight,
                description=args.description,
            )
        finally:
            await pool.close()

    with database(env) as dsn:
        _print_json(_run(main(dsn)))
    return 0


def cmd_subscriptions_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    async def main(dsn: str) -> list[dict[str, Any]]:
        from dispatcher.db import pool as db_pool  # noqa: PLC0415
        from dispatcher.db import repository  # noqa: PLC0415

        pool = await db_pool.create_pool(
            dsn, min_size=1, max_size=1, application_name="dispatcher-cli"
        )
        try:
            return await repository.Repository(pool).list_subscriptions()
        finally:
            await pool.close()

    with database(env) as dsn:
        subs = _run(main(dsn))
    if args.json:
        _print_json(subs)
    else:
        print(f"{'ID':36}  {'ENABLED':7}  {'MAX':>4}  {'EVENT TYPES':30}  URL")
        for s in subs:
            print(
                f"{s['id']:36}  {('yes' if s['enabled'] else 'no'):7}  {s['max_in_flight']:>4}  "
                f"{','.join(s['event_types'])[:30]:30}  {s['url']}"
            )
    return 0


def cmd_secrets_reencrypt(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    box = secret_box(env)
    if not box.encrypting:
        raise CliError("DISPATCHER_SECRET_KEYS is empty: there is no key to re-encrypt under")

    async def main(dsn: str) -> secretbox.Reencrypted:
        from dispatcher.db import pool as db_pool  # noqa: PLC0415

        pool = await db_pool.create_pool(
            dsn, min_size=1, max_size=1, application_name="dispatcher-cli"
        )
        try:
            return await secretbox.reencrypt(pool, box, batch=args.batch)
        finally:
            await pool.close()

    with database(env) as dsn:
        done = _run(main(dsn))
    _print_json({"key_id": box.current_key_id, **done.as_dict()})
    return 0


def cmd_secrets_generate_key(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    print(f"{args.key_id}:{secretbox.generate_key()}")
    return 0


def agent_settings_from_env(env: Mapping[str, str], database_url: str) -> Any:
    """``dispatcher agent`` settings. The webhook secret is required rather than generated:
    receivers verify with it, so a secret that changed at every restart would break them."""
    from dispatcher import signing  # noqa: PLC0415
    from dispatcher.agent import app as agent_app  # noqa: PLC0415

    secret = _env(env, "AGENT_WEBHOOK_SECRET")
    if secret is None:
        raise CliError(
            "AGENT_WEBHOOK_SECRET is not set; the agent signs callbacks with it and callers "
            "verify with it, so set a stable one, e.g. "
            f"AGENT_WEBHOOK_SECRET={signing.generate_secret()}"
        )
    try:
        signing.validate_secret(secret)
    except signing.SigningError as exc:
        raise CliError(f"AGENT_WEBHOOK_SECRET: {exc}") from None
    host, port = config.parse_listen(_env(env, "AGENT_LISTEN") or "127.0.0.1:8000")
    try:
        return agent_app.AgentSettings(
            database_url=database_url,
            webhook_secret=secret,
            listen_host=host,
            listen_port=port,
            api_key=_env(env, "AGENT_API_KEY") or "",
            max_prospects=_int(env, "AGENT_MAX_PROSPECTS", 100),
            max_body_bytes=_int(env, "AGENT_MAX_BODY_BYTES", 256 * 1024),
            step_delay_seconds=_float(env, "AGENT_STEP_DELAY", 0.4),
            concurrency=_int(env, "AGENT_CONCURRENCY", 4),
            poll_interval_seconds=_float(env, "AGENT_POLL_INTERVAL", 1.0),
            allow_cidrs=allow_cidrs(env),
            https_only=_bool(env, "DISPATCHER_HTTPS_ONLY"),
            secret_keys=_env(env, "DISPATCHER_SECRET_KEYS") or "",
            worker_id=_env(env, "DISPATCHER_WORKER_ID") or config.default_worker_id(),
        )
    except config.ConfigError as exc:
        raise CliError(str(exc)) from None


def cmd_agent(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from dispatcher import app  # noqa: PLC0415
    from dispatcher.agent import app as agent_app  # noqa: PLC0415

    with database(env) as dsn:
        settings = agent_settings_from_env(env, dsn)
        if args.migrate:
            _run(app.migrate_database(dsn))

        async def main() -> None:
            stop = asyncio.Event()
            install_signal_handlers(stop)
            await agent_app.Agent(settings).run(stop)

        try:
            _run(main())
        except migrate.SchemaNotReady as exc:
            raise CliError(str(exc)) from None
    return 0


def cmd_demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from dispatcher import demo  # noqa: PLC0415

    with database(env) as dsn:
        return int(_run(demo.run(dsn, env=env)))


def cmd_bench(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from dispatcher import bench  # noqa: PLC0415

    options = bench.options_from_args(args)
    with database(env) as dsn:
        return int(_run(bench.run(options, dsn, env=env)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply database migrations (idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("run", help="run the dispatcher (admin API on DISPATCHER_LISTEN)")
    p.add_argument("--migrate", action="store_true", help="apply migrations before starting")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("agent", help="run the reference lead-qualification agent (AGENT_LISTEN)")
    p.add_argument("--migrate", action="store_true", help="apply migrations before starting")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("demo", help="the whole story end to end on the embedded Postgres")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="measure throughput, latency and footprint on this machine")
    p.set_defaults(func=cmd_bench)
    from dispatcher import bench  # noqa: PLC0415 (heavy imports only for this subcommand)

    bench.add_arguments(p)

    subs = sub.add_parser("subscriptions", help="manage subscriptions").add_subparsers(
        dest="subcommand", required=True, metavar="SUBCOMMAND"
    )
    p = subs.add_parser("add", help="create a subscription; prints it as JSON (secret included)")
    p.add_argument("--url", required=True)
    p.add_argument(
        "--event-type", action="append", required=True, help="exact type or prefix.* (repeatable)"
    )
    p.add_argument("--secret", help="whsec_… secret; generated when omitted")
    p.add_argument("--signature-header", help="also sign the body in this header (sha256=<hex>)")
    p.add_argument("--max-in-flight", type=int, default=10)
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_subscriptions_add)
    p = subs.add_parser("list", help="list subscriptions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_subscriptions_list)
    # get/update/enable/disable/delete/rotate-secret/test, and the deliveries/events groups:
    # the admin API's operations for operators (same validators and SQL as /v1).
    from dispatcher import cli_manage  # noqa: PLC0415 (it imports this module)

    cli_manage.add_subscription_commands(subs)
    cli_manage.add_commands(sub)

    keys = sub.add_parser("secrets", help="subscription secrets at rest").add_subparsers(
        dest="subcommand", required=True, metavar="SUBCOMMAND"
    )
    p = keys.add_parser(
        "reencrypt",
        help="seal every secret under the first DISPATCHER_SECRET_KEYS key (online)",
    )
    p.add_argument("--batch", type=int, default=100, help="subscriptions per transaction")
    p.set_defaults(func=cmd_secrets_reencrypt)
    p = keys.add_parser("generate-key", help="print a new kid:base64key for DISPATCHER_SECRET_KEYS")
    p.add_argument("--key-id", default="k1")
    p.set_defaults(func=cmd_secrets_generate_key)
    return parser


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    try:
        logs.configure(
            level=_env(env, "DISPATCHER_LOG_LEVEL") or "info",
            fmt=_env(env, "DISPATCHER_LOG_FORMAT") or "auto",
        )
        result: int = args.func(args, env)
        return result
    except (CliError, ValueError) as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
