"""What every command receives: the environment, parsed once, and the helpers built from it.

``Context.from_env`` parses every variable of the settings table at start-up (a malformed
value is a one-line error before any command runs); commands then ask the context for the
settings, the address policy, the secret box or a database. The context never reads
``os.environ`` itself: ``main`` hands it the mapping.

Heavy modules (the database driver, aiohttp, pgserver) are imported inside the methods that
need them, so building the parser and the context stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher import config
from dispatcher.cli import settings as table

if TYPE_CHECKING:
    from dispatcher import secretbox, ssrf
    from dispatcher.agent import settings as agent_settings


class CliError(Exception):
    """A user-facing error: printed as one line without a traceback, exit status 2."""


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    env: Mapping[str, str]
    # Variables that are set, parsed (dispatcher.cli.settings.parse_environment).
    values: Mapping[str, Any]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Context:
        try:
            return cls(env=env, values=table.parse_environment(env))
        except table.SettingError as exc:
            raise CliError(str(exc)) from None

    def _fields(self, owner: str) -> dict[str, Any]:
        return table.fields_for(owner, self.values)

    def log_settings(self) -> config.LogSettings:
        return config.LogSettings(**self._fields("log"))

    def address_policy(self) -> ssrf.AddressPolicy:
        from dispatcher import ssrf  # noqa: PLC0415 (loads aiohttp)

        fields = self._fields("dispatcher")
        try:
            return ssrf.AddressPolicy.from_strings(
                fields.get("allow_cidrs", ()), fields.get("https_only", False)
            )
        except ValueError as exc:
            raise CliError(f"DISPATCHER_ALLOW_CIDRS: {exc}") from None

    def secret_box(self) -> secretbox.SecretBox:
        from dispatcher import secretbox  # noqa: PLC0415 (loads cryptography)

        try:
            return secretbox.SecretBox.from_spec(self.values.get("DISPATCHER_SECRET_KEYS", ""))
        except secretbox.SecretBoxError as exc:
            raise CliError(f"DISPATCHER_SECRET_KEYS: {exc}") from None

    def settings(self, database_url: str) -> config.Settings:
        """``dispatcher run`` settings; a bad combination is a CLI error before anything starts."""
        self.secret_box()
        try:
            return config.Settings(
                database_url=database_url,
                retry=config.RetryPolicy(**self._fields("retry")),
                endpoint_health=config.EndpointHealthPolicy(**self._fields("endpoint_health")),
                retention=config.RetentionPolicy(**self._fields("retention")),
                tracing=self.tracing_settings(),
                **self._fields("dispatcher"),
            )
        except config.ConfigError as exc:
            raise CliError(str(exc)) from None

    def tracing_settings(self) -> config.TracingSettings | None:
        """OpenTelemetry's variables, read together (one depends on another); raises
        ``config.ConfigError`` for a value the dispatcher cannot honour."""
        from dispatcher import tracing  # noqa: PLC0415 (loads the database driver's errors)

        return tracing.settings_from_env(self.env)

    def agent_settings(self, database_url: str) -> agent_settings.AgentSettings:
        """``dispatcher agent`` settings. The webhook secret is required rather than generated:
        receivers verify with it, so a secret that changed at every restart would break them."""
        from dispatcher import signing  # noqa: PLC0415
        from dispatcher.agent import settings as agent_settings  # noqa: PLC0415

        fields = self._fields("agent")
        secret = fields.pop("webhook_secret", None)
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
        try:
            return agent_settings.AgentSettings(
                database_url=database_url, webhook_secret=secret, **fields
            )
        except config.ConfigError as exc:
            raise CliError(str(exc)) from None

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """DATABASE_URL, or an embedded Postgres for the duration of the command."""
        url = self.values.get("DATABASE_URL")
        if url:
            yield url
            return
        from dispatcher.db import embedded  # noqa: PLC0415 (pgserver only when needed)

        data_dir = self.values.get(
            "DISPATCHER_PGDATA", table.BY_VARIABLE["DISPATCHER_PGDATA"].default_text()
        )
        server = embedded.EmbeddedPostgres(Path(data_dir))
        try:
            dsn = server.start()
        except Exception as exc:
            raise CliError(f"could not start the embedded Postgres: {exc}") from exc
        try:
            yield dsn
        finally:
            server.stop()


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's coroutine on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
