"""The README and docs/ cannot drift from the code or break their own links.

Checked against the real objects: the settings table against the variables the CLI reads,
every `dispatcher …` command against the CLI's parser, every `make …` against the Makefile,
metric names against the registry, the admin API table against the routes, each alert's
`runbook_url` (in the rule file and the generated PrometheusRule) against the runbook's
headings, and every relative link, anchors included, against the files it points at.

The runnable examples (SQL and Python producers, the documented publish statement, receiver
verification) run against a real database and a real delivery in
tests/integration/test_docs_examples.py; the helpers that find them live here. No I/O beyond
reading files.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client as prom
import pytest
import yaml

from dispatcher import cli, metrics
from dispatcher.cli import reference
from dispatcher.cli import settings as cli_settings
from dispatcher.web import admin_api

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAKEFILE = ROOT / "Makefile"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"
RUNBOOK = DOCS / "runbook.md"
# Where the alert rules send an operator: the runbook as the repository hosts it.
RUNBOOK_URL = "https://github.com/dispatcher-dev/dispatcher/blob/main/docs/runbook.md"
README_MAX_LINES = 250

# `dispatcher_…` identifiers in the docs that are not metrics: a SQL function, log events.
NOT_METRICS = frozenset({"dispatcher_claim", "dispatcher_started", "dispatcher_stopped"})
# Shell operators that end a command's arguments.
SHELL_OPERATORS = frozenset({">", ">>", "2>", "<", "|", "||", "&&", ";", "&"})
DOCS_TEST_BLOCKS = (
    "python-producer",
    "sql-producer",
    "publish-sql",
    "receiver-python",
    "receiver-stdlib",
)
# Pairs of markers a generator writes between; each must appear once, in order.
MARKERS = {
    "benchmark.md": ("<!-- bench:start -->", "<!-- bench:end -->"),
    "configuration.md": ("<!-- settings-table:start -->", "<!-- settings-table:end -->"),
}
# Environment variables the docs may name that the CLI does not read (compose-only knobs).
COMPOSE_ONLY_VARS = frozenset({"RECEIVER_SUBNET", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"})

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\[(?:[^\]]|\][^(])*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def doc(name: str) -> str:
    """The text of ``docs/<name>``."""
    return read(DOCS / name)


def all_docs() -> str:
    return "\n".join(read(path) for path in doc_files())


def marked_block(name: str) -> str:
    """The fenced code block right after ``<!-- docs-test: name -->``, wherever it lives."""
    pattern = re.compile(rf"<!-- docs-test: {re.escape(name)} -->\n```\w*\n(.*?)^```", re.M | re.S)
    found = [m.group(1) for path in doc_files() for m in pattern.finditer(read(path))]
    assert len(found) == 1, f"{len(found)} code blocks marked <!-- docs-test: {name} -->"
    return found[0]


def section(title: str, text: str) -> str:
    """A ``## title`` section up to the next heading of level 1 or 2."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"no '## {title}' section"
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


def _prose(text: str) -> str:
    """``text`` without fenced blocks and code spans, where a link is only an example."""
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`]*`", "", text)


def broken_links(path: Path, text: str) -> list[str]:
    """The relative links in ``text`` (a file at ``path``) that point at nothing."""
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: — not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve()
        if file_part and not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (not file_part or linked.suffix == ".md"):
            headings = anchors(read(linked) if file_part else text)
            if anchor not in headings:
                broken.append(f"{target}: no heading with that anchor")
    return broken


# -- the README and the map of the docs --------------------------------------------------------


def test_the_readme_stays_short() -> None:
    assert len(read(README).splitlines()) <= README_MAX_LINES


def test_the_readme_links_every_document() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in _LINK.findall(_prose(read(README)))
        if target.startswith("docs/")
    }
    assert {path.resolve() for path in DOCS.glob("*.md")} - linked == set()


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path, read(path)) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor() -> None:
    # Guards the guard: each kind of broken link is reported; code is not prose.
    text = (
        "[a](docs/nowhere.md) [b](docs/runbook.md#no-such-heading) [c](#missing) "
        "[ok](docs/runbook.md#alerts) [web](https://example.com/x) `[code](nowhere.md)`\n"
        "# Present\n[self](#present)\n"
    )
    assert broken_links(README, text) == [
        "docs/nowhere.md: no such file",
        "docs/runbook.md#no-such-heading: no heading with that anchor",
        "#missing: no heading with that anchor",
    ]


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("DispatcherOldestPendingAgeHigh", "dispatcheroldestpendingagehigh"),
        (
            "Rotate the master keys (`DISPATCHER_SECRET_KEYS`)",
            "rotate-the-master-keys-dispatcher_secret_keys",
        ),
        ("In Python: `dispatcher.receiver`", "in-python-dispatcherreceiver"),
        ("Metrics, logs, dashboards and alerts", "metrics-logs-dashboards-and-alerts"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


# -- commands the docs tell you to run ---------------------------------------------------------


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", read(MAKEFILE), re.M))


def test_the_quick_start_is_make_demo_then_make_test() -> None:
    # On a bare machine with Python 3.11 these two targets are the whole quick start.
    blocks = list(code_blocks(section("Quick start", read(README)), ("sh",)))
    assert blocks, "the quick start has no command block"
    commands = [line.split() for line in blocks[0].splitlines() if line.strip()]
    assert commands == [["make", "demo"], ["make", "test"]]
    assert {"demo", "test"} <= make_targets()


def test_every_make_command_in_the_docs_is_a_target() -> None:
    named = set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", all_docs(), re.M))
    assert named, "expected make commands"
    assert named - make_targets() == set()


def test_every_docs_test_block_is_marked_once() -> None:
    for name in DOCS_TEST_BLOCKS:
        assert marked_block(name).strip()


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_generated_regions_keep_their_markers(name: str) -> None:
    start, end = MARKERS[name]
    text = doc(name)
    assert (text.count(start), text.count(end)) == (1, 1)
    assert text.index(start) < text.index(end)


# -- configuration -----------------------------------------------------------------------------


def test_configuration_table_is_the_generated_one() -> None:
    start, end = MARKERS["configuration.md"]
    assert (start, end) == (reference.START_MARKER, reference.END_MARKER)
    text = doc("configuration.md")
    assert reference.with_reference(text) == text, (
        "run python -m dispatcher.cli.reference --write docs/configuration.md"
    )


def test_every_environment_variable_the_docs_name_exists() -> None:
    known = set(cli_settings.ENVIRONMENT)
    for name in set(re.findall(r"\b(?:DISPATCHER|AGENT)_[A-Z0-9_]*", all_docs())):
        if name.endswith("_"):  # a family such as DISPATCHER_RETRY_*
            assert any(k.startswith(name) for k in known), name
        else:
            assert name in known, f"the docs name {name}, which the CLI does not read"
    for name in COMPOSE_ONLY_VARS:
        assert name not in known


# -- CLI commands ------------------------------------------------------------------------------


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


def docs_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks(all_docs(), ("sh", "bash", "console")):
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


def test_the_docs_show_cli_commands() -> None:
    # The extraction works: the runbook's commands are among those found.
    found = {" ".join(argv[:2]) for argv in docs_commands()}
    assert {"migrate", "run", "deliveries retry-dead", "secrets reencrypt"} <= found


def test_every_cli_command_in_the_docs_parses() -> None:
    failures = {" ".join(argv): _parses(argv) for argv in docs_commands()}
    assert {cmd: why for cmd, why in failures.items() if why} == {}


def test_every_inline_cli_command_names_a_real_subcommand() -> None:
    # `dispatcher deliveries get ID` in prose: the command path must exist (arguments may be
    # placeholders or elided, so only the path is checked, via --help).
    failures = {}
    for span in re.findall(r"`dispatcher ([a-z][^`]*)`", all_docs()):
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


def test_admin_api_table_lists_exactly_the_routes() -> None:
    shown = set(
        re.findall(
            r"^\| `(GET|POST|PATCH|DELETE|PUT)` \| `/v1(/[^`]*)` \|", doc("subscriptions.md"), re.M
        )
    )
    assert shown == {(method, path) for method, path, _handler in admin_api.ROUTES}


# -- metrics -----------------------------------------------------------------------------------


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


def test_every_metric_the_docs_name_exists() -> None:
    mentioned = set(re.findall(r"\bdispatcher_[a-z0-9_]*[a-z0-9]", all_docs())) - NOT_METRICS
    assert mentioned - metric_names() == set()


def test_every_metric_is_documented() -> None:
    text = section("Metrics", doc("observability.md"))
    registry = prom.CollectorRegistry()
    metrics.Metrics(registry)
    missing = []
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        if f"| `{name}` |" not in text:
            missing.append(name)
    assert missing == []


# -- alerts and the runbook --------------------------------------------------------------------


def _rules(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def alert_rules() -> dict[str, dict[str, Any]]:
    return _rules(yaml.safe_load(read(ALERTS))["groups"])


def runbook_alert_anchors() -> set[str]:
    return anchors(section("Alerts", read(RUNBOOK)))


def test_every_alert_has_a_runbook_section_and_no_section_lacks_an_alert() -> None:
    assert runbook_alert_anchors() == {name.lower() for name in alert_rules()}


@pytest.mark.parametrize("source", [ALERTS, PROMETHEUS_RULE], ids=lambda p: p.name)
def test_every_runbook_url_points_at_its_alerts_runbook_section(source: Path) -> None:
    loaded = yaml.safe_load(read(source))
    rules = _rules(loaded["spec"]["groups"] if source == PROMETHEUS_RULE else loaded["groups"])
    assert rules.keys() == alert_rules().keys()
    present = anchors(read(RUNBOOK))
    for name, rule in rules.items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOK_URL}#{name.lower()}", name
        assert name.lower() in present, f"{name}: docs/runbook.md has no such heading"


def test_the_alert_unit_tests_expect_the_runbook_urls() -> None:
    # promtool compares annotations exactly; without promtool this keeps the suite honest.
    urls = {name: rule["annotations"]["runbook_url"] for name, rule in alert_rules().items()}
    checked = 0
    for case in yaml.safe_load(read(ALERTS_TEST))["tests"]:
        for check in case["alert_rule_test"]:
            for expected in check.get("exp_alerts") or ():
                annotations = expected.get("exp_annotations", {})
                if "runbook_url" in annotations:
                    assert annotations["runbook_url"] == urls[check["alertname"]]
                    checked += 1
    assert checked >= len(urls)


def test_every_alert_is_in_the_observability_table() -> None:
    text = section("Alerts", doc("observability.md"))
    for name in alert_rules():
        assert f"| `{name}` |" in text
        assert f"(runbook.md#{name.lower()})" in text, f"{name}: no link to its runbook section"
