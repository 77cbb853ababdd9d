"""Offline company data for the reference agent: email domain → (company size, industry).

A built-in table covers well-known domains; anything else gets a deterministic guess derived
from a hash of the domain, so the same prospect always enriches to the same company. This
module never touches the network or the database: the agent has to run on a laptop with no
access to anything, and its results must be reproducible in tests.
"""

from __future__ import annotations

import dataclasses
import hashlib


class EnrichmentError(Exception):
    """A prospect's domain cannot belong to a real company (a reserved TLD)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Company:
    domain: str
    company_size: int
    industry: str
    # "table" for a known domain, "estimate" for the hash-derived fallback.
    source: str


# Known domains. Sizes are rough headcounts; the point is stable, plausible-looking data.
KNOWN_COMPANIES: dict[str, tuple[int, str]] = {
    "stripe.com": (8000, "Software"),
    "github.com": (3000, "Software"),
    "gitlab.com": (2100, "Software"),
    "shopify.com": (8300, "E-commerce"),
    "atlassian.com": (12000, "Software"),
    "datadoghq.com": (6500, "Software"),
    "cloudflare.com": (4000, "Cloud"),
    "openai.com": (3500, "Artificial Intelligence"),
    "nvidia.com": (29000, "Semiconductors"),
    "salesforce.com": (72000, "Software"),
    "hubspot.com": (7600, "Software"),
    "zapier.com": (800, "Software"),
    "acme.io": (120, "Software"),
    "initech.com": (450, "Software"),
    "hooli.xyz": (9000, "Cloud"),
    "piedpiper.com": (45, "Software"),
    "globex.com": (2300, "Manufacturing"),
    "umbrella-corp.com": (15000, "Pharmaceuticals"),
    "wonka.com": (600, "Food & Beverage"),
    "dundermifflin.com": (30, "Retail"),
    "gekko.finance": (80, "Financial Services"),
    "tinyshop.store": (12, "Retail"),
    "cornerbakery.shop": (25, "Food & Beverage"),
    "walmart.com": (2100000, "Retail"),
    "ikea.com": (220000, "Retail"),
    "mayoclinic.org": (76000, "Healthcare"),
    "harvard.edu": (20000, "Education"),
    # Free-mail: a person, not a company.
    "gmail.com": (1, "Consumer"),
    "outlook.com": (1, "Consumer"),
    "yahoo.com": (1, "Consumer"),
    "proton.me": (1, "Consumer"),
}

# Industries a criteria value stands for; a criteria string matches itself case-insensitively
# as well.
INDUSTRY_FAMILIES: dict[str, frozenset[str]] = {
    "tech": frozenset(
        {"software", "cloud", "artificial intelligence", "semiconductors", "cybersecurity"}
    ),
    "retail": frozenset({"retail", "e-commerce"}),
    "health": frozenset({"healthcare", "pharmaceuticals"}),
    "finance": frozenset({"financial services"}),
}

_FALLBACK_INDUSTRIES = (
    "Software",
    "Retail",
    "Manufacturing",
    "Financial Services",
    "Healthcare",
    "Education",
    "Cloud",
    "Media",
)
_FALLBACK_SIZES = (8, 25, 40, 75, 150, 320, 900, 2500)

# RFC 2606 / RFC 6761 names that can never be a company's mail domain.
RESERVED_TLDS = frozenset({"invalid", "test", "example", "localhost", "local"})


def _digest(domain: str) -> bytes:
    # sha256, not hash(): Python's str hash is salted per process, which would make the
    # "deterministic" fallback differ between runs.
    return hashlib.sha256(domain.encode()).digest()


def domain_of(email: str) -> str:
    return email.rpartition("@")[2].lower().rstrip(".")


def lookup(domain: str) -> Company:
    """Company data for a domain; raise ``EnrichmentError`` for a reserved TLD."""
    domain = domain.lower().rstrip(".")
    tld = domain.rpartition(".")[2]
    if tld in RESERVED_TLDS:
        raise EnrichmentError(f"no company data for {domain}: .{tld} is a reserved TLD")
    known = KNOWN_COMPANIES.get(domain)
    if known is not None:
        return Company(domain, known[0], known[1], "table")
    digest = _digest(domain)
    size = _FALLBACK_SIZES[digest[0] % len(_FALLBACK_SIZES)]
    # Spread sizes a little so two unknown domains rarely tie exactly.
    size += digest[1] % max(1, size // 4)
    industry = _FALLBACK_INDUSTRIES[digest[2] % len(_FALLBACK_INDUSTRIES)]
    return Company(domain, size, industry, "estimate")


def industry_matches(industry: str, wanted: str | None) -> bool:
    """Whether ``industry`` satisfies the criteria's ``industry`` (absent → anything does)."""
    if wanted is None:
        return True
    key = wanted.strip().lower()
    return industry.lower() == key or industry.lower() in INDUSTRY_FAMILIES.get(key, frozenset())


def signal_points(domain: str) -> int:
    """A small, stable per-domain bonus (0..10) so equal companies do not all tie."""
    return _digest(domain)[3] % 11
