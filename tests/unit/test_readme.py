"""The README cannot drift from the code: configuration table, CLI commands, metric names,
runbook anchors, the producer SQL and the quick start are checked against the real objects.

The README's runnable examples (SQL producer, Python producer, receiver verification) are run
against a real database and a real delivery in tests/integration/test_readme.py; the helpers
that find them live here. No I/O beyond reading files.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import prometheus_client as prom
import pytest
import yaml

from dispatcher import api, cli, metrics
from dispatcher.db import outbox

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Anchors the alert rules link to (deploy/prometheus/alerts.yml); fixed so links never break.
RUNBOOK_ANCHORS = (
    "runbook-down",
    "runbook-backlog",
    "runbook-oldest-pending",
    "runbook-failure-ratio",
    "runbook-dead-letters",
    "runbook-subscription-disabled",
)
# `dispatcher_…` identifiers in the README that are not metrics: a SQL function, log events.
NOT_METRICS = frozenset({"dispatcher_claim", "dispatcher_started", "dispatcher_stopped"})
# Shell operators that end a command's arguments.
SHELL_OPERATORS = frozenset({">", ">>", "2>", "<", "|", "||", "&&", ";", "&"})
DOCS_TEST_BLOCKS = ("python-producer", "sql-producer", "receiver-python", "receiver-stdlib")
# Environment variables the README may name that the CLI does not read (compose-only knobs).
COMPOSE_ONLY_VARS = frozenset({"RECEIVER_SUBNET", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"})

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def readme() -> str:
    return README.read_text(encoding="utf-8")


def marked_block(name: str, text: str | None = None) -> str:
    """The fenced code block right after ``<!-- docs-test: name -->``."""
    text = readme() if text is None else text
    match = re.search(
        rf"<!-- docs-test: {re.escape(name)} -->\n```\w*\n(.*?)^```", text, re.M | re.S
    )
    assert match, f"README has no code block marked <!-- docs-test: {name} -->"
    return match.group(1)


def section(title: str, text: str | None = None) -> str:
    """A ``## title`` section up to the next level-2 heading."""
    text = readme() if text is None else text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, languages: tuple[str, ...]) -> Iterator[str]:
    for match in _FENCE.finditer(text):
        if match.group(1) in languages:
            yield match.group(2)


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: markup dropped, lower-cased, punctuation other than ``-`` and
    ``_`` removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    inside_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            inside_fence = not inside_fence
            continue
        match = None if inside_fence else re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


# -- quick start and markers ---------------------------------------------------------------------


def test_quick_start_is_exactly_make_demo_then_make_test() -> None:
    blocks = list(code_blocks(section("Quick start"), ("sh",)))
    assert blocks, "the quick start has no command block"
    commands = [line.strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_every_docs_test_block_is_marked() -> None:
    for name in DOCS_TEST_BLOCKS:
        assert marked_block(name).strip()


def test_benchmark_section_keeps_its_markers_and_commands() -> None:
    bench = section("Benchmark")
    assert bench.count("<!-- bench:start -->") == 1
    assert bench.count("<!-- bench:end -->") == 1
    assert bench.index("<!-- bench:start -->") < bench.index("<!-- bench:end -->")
    assert "make bench" in bench
    assert "dispatcher bench --json" in bench


def test_the_producer_sql_is_the_one_publish_runs() -> None:
    shown = [b.strip() for b in code_blocks(section("Producing events"), ("sql",))]
    assert outbox.INSERT_SQL.strip() in shown


def test_what_was_not_checked_names_grafana_and_the_container_runtimes() -> None:
    text = section("What was not checked here")
    for word in ("Grafana", "Docker", "compose", "Kubernetes"):
        assert word in text


# -- configuration ---------------------------------------------------------------------------


def _config_rows() -> list[tuple[str, str]]:
    rows = []
    for line in section("Configuration").splitlines():
        match = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \|", line)
        if match:
            rows.append((match.group(1), match.group(2).strip()))
    return rows


def test_configuration_table_lists_exactly_the_cli_environment() -> None:
    rows = _config_rows()
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert set(names) == set(cli.ENVIRONMENT), (
        f"missing: {sorted(set(cli.ENVIRONMENT) - set(names))}, "
        f"not read by the CLI: {sorted(set(names) - set(cli.ENVIRONMENT))}"
    )


def test_configuration_defaults_match_the_cli() -> None:
    for name, shown in _config_rows():
        default = cli.ENVIRONMENT[name][0]
        expected = f"`{default}`" if default else "(empty)"
        assert shown == expected, f"{name}: README says {shown}, the CLI says {expected}"


def test_every_environment_variable_the_readme_names_exists() -> None:
    text = readme()
    known = set(cli.ENVIRONMENT)
    for name in set(re.findall(r"\b(?:DISPATCHER|AGENT)_[A-Z0-9_]*", text)):
        if name.endswith("_"):  # a family such as DISPATCHER_RETRY_*
            assert any(k.startswith(name) for k in known), name
        else:
            assert name in known, f"README names {name}, which the CLI does not read"
    for name in COMPOSE_ONLY_VARS:
        assert name not in known


# -- CLI commands ----------------------------------------------------------------------------


def _logical_lines(block: str) -> Iterator[str]:
    """Shell lines with backslash continuations joined."""
    pending = ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield pending + raw
        pending = ""
    if pending:
        yield pending


def _until_operator(tokens: list[str]) -> list[str]:
    for i, token in enumerate(tokens):
        if token in SHELL_OPERATORS:
            return tokens[:i]
    return tokens


def _dispatcher_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after a ``dispatcher`` command word, or None when the line runs none."""
    if tokens[:2] == ["docker", "run"]:
        for i, token in enumerate(tokens):
            if token.startswith("dispatcher:"):
                return _until_operator(tokens[i + 1 :]) or None
        return None
    for i, token in enumerate(tokens):
        is_command = token == "dispatcher" or token.endswith("/dispatcher")
        starts = i == 0 or tokens[i - 1] in {"--", "-m"} | SHELL_OPERATORS
        if is_command and starts:
            return _until_operator(tokens[i + 1 :])
    return None


def readme_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks(readme(), ("sh", "bash", "console")):
        for line in _logical_lines(block):
            if "dispatcher" not in line:
                continue
            argv = _dispatcher_argv(shlex.split(line, comments=True) or [""])
            if argv is not None:
                commands.append(argv)
    return commands


def _parses(argv: list[str]) -> str | None:
    """None when ``dispatcher argv`` parses; otherwise argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return None
        return err.getvalue().strip() or f"exit {exc.code}"
    return None


def test_readme_shows_cli_commands() -> None:
    # The extraction works: the runbook's commands are among those found.
    found = {" ".join(argv[:2]) for argv in readme_commands()}
    assert {"migrate", "run", "deliveries retry-dead", "secrets reencrypt"} <= found


def test_every_cli_command_in_the_readme_parses() -> None:
    failures = {" ".join(argv): _parses(argv) for argv in readme_commands()}
    assert {cmd: why for cmd, why in failures.items() if why} == {}


def test_every_inline_cli_command_names_a_real_subcommand() -> None:
    # `dispatcher deliveries get ID` in prose: the command path must exist (arguments may be
    # placeholders or elided, so only the path is checked, via --help).
    failures = {}
    for span in re.findall(r"`dispatcher ([a-z][^`]*)`", readme()):
        words = []
        for token in shlex.split(span):
            if "…" in token or token.startswith("-") or token == "ID":
                break
            words.append(token)
        why = _parses([*words, "--help"])
        if why:
            failures[span] = why
    assert failures == {}


def test_argument_parsing_rejects_a_wrong_command() -> None:
    # Guards the guard: an unknown subcommand is reported, not silently accepted.
    assert _parses(["deliveries", "replay-everything"]) is not None
    assert _parses(["subscriptions", "add", "--url", "https://example.com/x"]) is not None


# -- metrics ---------------------------------------------------------------------------------


def metric_names() -> set[str]:
    """Every sample name the dispatcher's registry can expose."""
    registry = prom.CollectorRegistry()
    metrics.Metrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def test_every_metric_the_readme_names_exists() -> None:
    mentioned = set(re.findall(r"\bdispatcher_[a-z0-9_]*[a-z0-9]", readme())) - NOT_METRICS
    assert mentioned - metric_names() == set()


def test_every_metric_is_documented() -> None:
    text = section("Metrics, dashboards and alerts")
    registry = prom.CollectorRegistry()
    metrics.Metrics(registry)
    missing = []
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        if f"| `{name}` |" not in text:
            missing.append(name)
    assert missing == []


# -- alerts and anchors ----------------------------------------------------------------------


def _alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_runbook_url_anchor_is_a_readme_heading() -> None:
    present = anchors(readme())
    linked = set()
    for rule in _alert_rules():
        url = str(rule["annotations"]["runbook_url"])  # type: ignore[index]
        assert "#" in url, f"{rule['alert']}: runbook_url has no anchor"
        linked.add(url.rsplit("#", 1)[1])
    assert linked == set(RUNBOOK_ANCHORS)
    assert linked - present == set()


def test_every_alert_is_in_the_readme() -> None:
    text = section("Metrics, dashboards and alerts")
    for rule in _alert_rules():
        assert f"`{rule['alert']}`" in text


def test_internal_links_resolve() -> None:
    text = readme()
    present = anchors(text)
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "expected internal links"
    assert links - present == set()


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Runbook: oldest pending", "runbook-oldest-pending"),
        (
            "Rotate the master keys (`DISPATCHER_SECRET_KEYS`)",
            "rotate-the-master-keys-dispatcher_secret_keys",
        ),
        ("In Python: `dispatcher.receiver`", "in-python-dispatcherreceiver"),
        ("Metrics, dashboards and alerts", "metrics-dashboards-and-alerts"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_admin_api_table_lists_exactly_the_routes() -> None:
    shown = set(
        re.findall(
            r"^\| `(GET|POST|PATCH|DELETE|PUT)` \| `/v1(/[^`]*)` \|", section("Subscriptions"), re.M
        )
    )
    assert shown == {(method, path) for method, path, _handler in api.ROUTES}
