"""Generate ``deploy/k8s/prometheusrule.yaml`` from ``deploy/prometheus/alerts.yml``.

The compose stack's Prometheus and a Prometheus Operator cluster must fire the same alerts, so
there is one source: ``alerts.yml`` (checked and unit-tested with ``promtool``). A
PrometheusRule's ``spec`` has exactly the rule-file format, so its ``groups:`` block is copied
as text, indented under ``spec:``, comments and block scalars kept. ``--check`` (run by
``tests/integration/test_deploy.py``) fails when the committed manifest has drifted.

Stdlib only; no I/O outside ``main()``.

Usage: ``python deploy/k8s/generate_rules.py`` rewrites the manifest; ``--check`` exits 1 on
drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
MANIFEST = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/generate_rules.py: do not edit.
# Change alerts.yml, then run `python deploy/k8s/generate_rules.py`.
#
# The Prometheus Operator loads a PrometheusRule whose labels match the Prometheus resource's
# ruleSelector; with kube-prometheus-stack that is usually `release: <helm release name>`:
# add it below. The rules select job="dispatcher", which podmonitor.yaml sets.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: dispatcher
  labels:
    app.kubernetes.io/name: dispatcher
    app.kubernetes.io/part-of: dispatcher
spec:
"""


def render(alerts_text: str) -> str:
    """The manifest for a rule file's text: everything from its top-level ``groups:`` on."""
    lines = alerts_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        raise ValueError("alerts.yml has no top-level `groups:` line") from None
    body = [f"  {line}" if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed manifest differs"
    )
    args = parser.parse_args(argv)
    wanted = render(ALERTS.read_text(encoding="utf-8"))
    current = MANIFEST.read_text(encoding="utf-8") if MANIFEST.exists() else None
    if current == wanted:
        return 0
    if args.check:
        print(
            f"stale {MANIFEST} (run `python deploy/k8s/generate_rules.py`)",
            file=sys.stderr,
        )
        return 1
    MANIFEST.write_text(wanted, encoding="utf-8")
    print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
