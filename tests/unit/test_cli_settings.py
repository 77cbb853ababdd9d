"""The settings table: every row fills real fields, the environment is parsed once into the
context, and the settings built from it carry the dataclass defaults unless a variable is set."""

from __future__ import annotations

import dataclasses

import pytest

from dispatcher import config
from dispatcher.agent import settings as agent_settings
from dispatcher.cli import context, reference
from dispatcher.cli import settings as table

SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


def test_every_target_is_a_field_of_its_owner() -> None:
    for setting in table.TABLE:
        for target in setting.targets:
            owner, _, name = target.partition(".")
            fields = {f.name for f in dataclasses.fields(table.OWNERS[owner])}
            wanted = {"listen_host", "listen_port"} if name == table.LISTEN else {name}
            assert wanted <= fields, f"{setting.variable} → {target}"


def test_one_row_per_variable_and_the_reference_lists_them_all() -> None:
    names = [s.variable for s in table.TABLE]
    assert len(names) == len(set(names))
    rows = reference.reference_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == names


def test_nothing_set_gives_the_dataclass_defaults() -> None:
    ctx = context.Context.from_env({})
    built = ctx.settings("postgresql://x/y")
    assert built == config.Settings(database_url="postgresql://x/y", worker_id=built.worker_id)
    assert ctx.log_settings() == config.LogSettings()
    agent = context.Context.from_env({"AGENT_WEBHOOK_SECRET": SECRET}).agent_settings("dsn")
    assert agent == agent_settings.AgentSettings(
        database_url="dsn", webhook_secret=SECRET, worker_id=agent.worker_id
    )


def test_set_variables_reach_their_fields() -> None:
    env = {
        "DISPATCHER_LISTEN": "127.0.0.1:9999",
        "DISPATCHER_MAX_IN_FLIGHT": "7",
        "DISPATCHER_RETRY_BASE": "2.5",
        "DISPATCHER_BREAKER_RATIO": "0.25",
        "DISPATCHER_RETENTION_BATCH": "9",
        "DISPATCHER_HTTPS_ONLY": "yes",
        "DISPATCHER_ALLOW_CIDRS": " 10.0.0.0/8, ,127.0.0.1/32",
        "DISPATCHER_OPEN_ENDPOINTS": "",
        "DISPATCHER_WORKER_ID": "w1",
        "DISPATCHER_LOG_LEVEL": "debug",
        "AGENT_WEBHOOK_SECRET": SECRET,
        "AGENT_LISTEN": "[::1]:8001",
        "AGENT_MAX_PROSPECTS": "3",
    }
    ctx = context.Context.from_env(env)
    s = ctx.settings("dsn")
    assert (s.listen_host, s.listen_port, s.max_in_flight) == ("127.0.0.1", 9999, 7)
    assert s.retry.base_seconds == 2.5
    assert s.endpoint_health.breaker_failure_ratio == 0.25
    assert s.retention.batch == 9
    assert s.https_only is True
    assert s.allow_cidrs == ("10.0.0.0/8", "127.0.0.1/32")
    # Set but empty: every probe needs the token (unlike other variables, empty is a value).
    assert s.open_endpoints == ()
    assert s.worker_id == "w1"
    assert ctx.log_settings().level == "debug"
    agent = ctx.agent_settings("dsn")
    assert (agent.listen_host, agent.listen_port, agent.max_prospects) == ("::1", 8001, 3)
    assert (agent.worker_id, agent.https_only) == ("w1", True)
    assert agent.allow_cidrs == ("10.0.0.0/8", "127.0.0.1/32")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DISPATCHER_MAX_IN_FLIGHT", "many", "is not a whole number"),
        ("DISPATCHER_RETRY_CAP", "6h", "is not a number"),
        ("DISPATCHER_HTTPS_ONLY", "perhaps", "is not a boolean"),
        ("DISPATCHER_LISTEN", "8090", "must look like host:port"),
    ],
)
def test_a_malformed_value_is_one_error_naming_the_variable(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(context.CliError) as raised:
        context.Context.from_env({variable: value})
    assert str(raised.value).startswith(f"{variable}={value!r} ")
    assert message in str(raised.value)


def test_rendered_defaults() -> None:
    env = table.ENVIRONMENT
    assert env["DISPATCHER_LISTEN"][0] == "127.0.0.1:8090"
    assert env["DISPATCHER_OPEN_ENDPOINTS"][0] == "healthz,readyz,metrics"
    assert env["DISPATCHER_HTTPS_ONLY"][0] == "false"
    assert env["DISPATCHER_RETRY_CAP"][0] == "21600"
    assert env["AGENT_STEP_DELAY"][0] == "0.4"
    assert env["DISPATCHER_ADMIN_TOKEN"][0] == ""
