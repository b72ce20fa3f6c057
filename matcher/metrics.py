"""The matcher's Prometheus metrics. Labels carry decisions, outcomes, node
names and status codes only: never a subject, template, probe, share or score."""
from __future__ import annotations

from prometheus_client import Counter

VERIFICATIONS = Counter(
    "splitvault_matcher_verifications_total",
    "Verifications by outcome: MATCH, NO_MATCH, or the status code of a verification that ended without a decision.",
    ["decision"],
)
IDENTIFICATIONS = Counter(
    "splitvault_matcher_identifications_total",
    "Identifications (1:N on shares) by outcome: MATCH, NO_MATCH, AMBIGUOUS, or the status code of one without a decision.",
    ["decision"],
)
ENROLMENTS = Counter(
    "splitvault_matcher_enrolments_total",
    "Templates enrolled (Enroll and EnrollStream), by outcome: enrolled, already_enrolled or the failure code.",
    ["outcome"],
)
NODE_ERRORS = Counter(
    "splitvault_matcher_node_errors_total",
    "Calls to a shareholder that did not succeed, by node, method and status code.",
    ["node", "method", "code"],
)
SUSPECTS = Counter(
    "splitvault_matcher_share_suspects_total",
    "Shares a node returned that were inconsistent with the others (outvoted or malformed), by node.",
    ["node"],
)
