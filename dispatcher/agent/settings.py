"""Settings of ``dispatcher agent``: a frozen, validated dataclass and nothing else.

Kept apart from the agent's composition root so the CLI's settings table can read the
defaults without loading the web stack. No I/O here.
"""

from __future__ import annotations

import dataclasses

from dispatcher import config


@dataclasses.dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything ``dispatcher agent`` needs; defaults are the documented ones."""

    database_url: str = dataclasses.field(repr=False)
    webhook_secret: str = dataclasses.field(repr=False)
    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    api_key: str = dataclasses.field(repr=False, default="")
    max_prospects: int = 100
    max_body_bytes: int = 256 * 1024
    # Pause before each step: the pipeline is instant otherwise, and the demo is for humans.
    step_delay_seconds: float = 0.4
    concurrency: int = 4
    poll_interval_seconds: float = 1.0
    # A job picked up more often than this (each pick-up after a crash counts) fails.
    max_runs: int = 10
    allow_cidrs: tuple[str, ...] = ()
    https_only: bool = False
    # Subscription secrets at rest, as for the dispatcher: "kid:base64key,…" (secretbox).
    secret_keys: str = dataclasses.field(repr=False, default="")
    worker_id: str = dataclasses.field(default_factory=config.default_worker_id)

    def __post_init__(self) -> None:
        if not self.webhook_secret:
            raise config.ConfigError("the agent needs a webhook secret")
        if self.max_prospects < 1 or self.max_body_bytes < 1024:
            raise config.ConfigError("max prospects must be >= 1 and max body >= 1024 bytes")
        if self.step_delay_seconds < 0 or self.poll_interval_seconds <= 0:
            raise config.ConfigError("step delay must be >= 0 and poll interval > 0")
        if self.concurrency < 1 or self.max_runs < 1:
            raise config.ConfigError("concurrency and max runs must be >= 1")
