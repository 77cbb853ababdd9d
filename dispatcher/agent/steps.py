"""The lead-qualification pipeline as pure functions: enrichment → criteria check → scoring.

Each step turns the previous step's stored output into its own, and each has a payload
builder for the webhook it announces. Nothing here touches the database, the clock or the
network: the runner supplies the timestamp and commits the result, so a step re-run after a
crash computes exactly what the first run would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from dispatcher.agent import enrichment

EVENT_PROGRESS = "LEAD_QUALIFICATION_PROGRESS"
EVENT_COMPLETE = "LEAD_QUALIFICATION_COMPLETE"
EVENT_FAILED = "LEAD_QUALIFICATION_FAILED"
EVENT_TYPES = (EVENT_PROGRESS, EVENT_COMPLETE, EVENT_FAILED)

STATUS_COMPLETE = "COMPLETE"
STATUS_FAILED = "FAILED"

# How many enriched rows a progress webhook carries; the full set comes with COMPLETE.
SAMPLE_SIZE = 3


class StepFailed(Exception):
    """The job cannot go on; ``reason`` is what the caller is told."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    number: int
    key: str  # part of the event id: "<job_id>:<key>"
    status: str  # job status once this step has committed
    current_step: str  # human label, as in progress.current_step
    percentage: int
    event: str


STEPS: tuple[Step, ...] = (
    Step(1, "enrichment", "DATA_ENRICHMENT_COMPLETE", "Enriching Data", 50, EVENT_PROGRESS),
    Step(2, "criteria", "CRITERIA_CHECK_COMPLETE", "Checking Criteria", 75, EVENT_PROGRESS),
    Step(3, "scoring", STATUS_COMPLETE, "Scoring", 100, EVENT_COMPLETE),
)
FAILED_KEY = "failed"


def event_id(job_id: str, key: str) -> str:
    """Stable per (job, step): a re-run step cannot publish a second event."""
    return f"{job_id}:{key}"


# -- the steps -------------------------------------------------------------------------------


def enrich(prospects: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for prospect in prospects:
        email = str(prospect["email"])
        try:
            company = enrichment.lookup(enrichment.domain_of(email))
        except enrichment.EnrichmentError as exc:
            raise StepFailed(f"enrichment failed for {email}: {exc}") from None
        rows.append(
            {
                "email": email,
                "company_size": company.company_size,
                "industry": company.industry,
                "source": company.source,
            }
        )
    return rows


def check_criteria(
    enriched: Sequence[Mapping[str, Any]], criteria: Mapping[str, Any]
) -> list[dict[str, Any]]:
    min_size = int(criteria.get("min_company_size", 0))
    wanted = criteria.get("industry")
    rows = []
    for row in enriched:
        meets_size = int(row["company_size"]) >= min_size
        meets_industry = enrichment.industry_matches(str(row["industry"]), wanted)
        rows.append(
            {
                **row,
                "meets_size": meets_size,
                "meets_industry": meets_industry,
                "qualified": meets_size and meets_industry,
            }
        )
    return rows


def score(
    checked: Sequence[Mapping[str, Any]], criteria: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """0..100: up to 50 for size against the minimum, 40 for the industry (5 when it misses),
    plus a stable 0..10 per-domain signal. A qualified lead scores at least 90."""
    min_size = int(criteria.get("min_company_size", 0))
    results = []
    for row in checked:
        size = int(row["company_size"])
        size_points = 50 if size >= min_size else round(50 * size / max(min_size, 1))
        industry_points = 40 if row["meets_industry"] else 5
        signal = enrichment.signal_points(enrichment.domain_of(str(row["email"])))
        results.append(
            {
                "email": row["email"],
                "company_size": size,
                "industry": row["industry"],
                "qualified": bool(row["qualified"]),
                "score": min(100, size_points + industry_points + signal),
            }
        )
    return results


# -- webhook payloads ------------------------------------------------------------------------


def sample(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"email": r["email"], "company_size": r["company_size"], "industry": r["industry"]}
        for r in rows[:SAMPLE_SIZE]
    ]


def progress_payload(
    job_id: str, step: Step, timestamp: str, rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "event": EVENT_PROGRESS,
        "job_id": job_id,
        "timestamp": timestamp,
        "status": step.status,
        "progress": {"current_step": step.current_step, "percentage": step.percentage},
        "enriched_data_sample": sample(rows),
    }
    if "qualified" in (rows[0] if rows else {}):
        payload["criteria_summary"] = {
            "prospects": len(rows),
            "qualified": sum(1 for r in rows if r["qualified"]),
        }
    return payload


def complete_payload(
    job_id: str, step: Step, timestamp: str, results: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {
        "event": EVENT_COMPLETE,
        "job_id": job_id,
        "timestamp": timestamp,
        "status": STATUS_COMPLETE,
        "progress": {"current_step": step.current_step, "percentage": step.percentage},
        "results": [dict(r) for r in results],
    }


def failed_payload(job_id: str, step: Step | None, timestamp: str, reason: str) -> dict[str, Any]:
    return {
        "event": EVENT_FAILED,
        "job_id": job_id,
        "timestamp": timestamp,
        "status": STATUS_FAILED,
        "failed_step": step.current_step if step is not None else None,
        "reason": reason,
    }
