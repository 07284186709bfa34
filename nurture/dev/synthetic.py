"""Seeded synthetic leads for the demo and the benchmarks: reproducible, varied, plausible."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from nurture.store.db import session_scope
from nurture.store.models import Account, Lead
from nurture.store.sql import insert_for, inserted

FIRST = [
    "Ada",
    "Ben",
    "Chloé",
    "Dmitri",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Uma",
    "Victor",
    "Wen",
    "Xavier",
    "Yara",
    "Zoë",
]
LAST = [
    "Adams",
    "Berger",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "García",
    "Hughes",
    "Ito",
    "Jansen",
    "Kowalski",
    "López",
    "Müller",
    "Novak",
    "O'Brien",
    "Patel",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Vogel",
    "Weber",
    "Young",
    "Zhang",
]
COMPANIES = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Wonka",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Aperture",
    "Vandelay",
    "Pied Piper",
    "Dunder",
]
SUFFIXES = ["Labs", "Systems", "Group", "Works", "Analytics", "Logistics", "Health", "Foods"]
TITLES = [
    "CEO",
    "CTO",
    "VP Marketing",
    "Head of Sales",
    "Founder",
    "Engineer",
    "Analyst",
    "Marketing Manager",
    "Office Manager",
    "Intern",
]
COUNTRIES = [
    ("US", None),
    ("US", "America/Los_Angeles"),
    ("GB", None),
    ("DE", None),
    ("FR", None),
    ("NL", None),
    ("CA", None),
    ("AU", None),
    ("JP", None),
    ("BR", None),
    ("IN", None),
    ("ES", None),
]
B2B_SOURCES = ["website", "website", "social", "marketplace", "partner", "sales"]
RETAIL_SOURCES = ["website", "social", "marketplace", "franchise", "franchise"]
FREE_MAIL = ["gmail.com", "outlook.com", "yahoo.com", "proton.me"]


@dataclass(frozen=True)
class SyntheticLead:
    """One generated lead, with a hidden propensity to engage used by the simulator."""

    email: str
    first_name: str
    last_name: str
    company: str | None
    source: str
    country: str
    timezone: str | None
    attributes: dict[str, Any]


def generate(count: int, *, seed: int = 7, start: int = 0) -> Iterator[SyntheticLead]:
    """Yield ``count`` leads; the same seed and start always give the same leads."""
    for n in range(start, start + count):
        rng = random.Random(f"{seed}:{n}")
        first, last = rng.choice(FIRST), rng.choice(LAST)
        country, tz = rng.choice(COUNTRIES)
        if rng.random() < 0.55:
            company = f"{rng.choice(COMPANIES)} {rng.choice(SUFFIXES)} {n % 400}"
            domain = company.lower().replace(" ", "") + ".example"
            title = rng.choice(TITLES)
            attributes: dict[str, Any] = {
                "type": "b2b",
                "title": title,
                "employees": rng.choice([5, 20, 50, 120, 400, 2000]),
                "propensity": round(
                    rng.betavariate(2, 5) + (0.15 if title in TITLES[:5] else 0), 3
                ),
            }
            source = rng.choice(B2B_SOURCES)
        else:
            company = None
            domain = rng.choice(FREE_MAIL)
            attributes = {
                "type": "retail",
                "loyalty": rng.random() < 0.3,
                "store": f"store-{rng.randint(1, 40):02d}",
                "propensity": round(rng.betavariate(2, 6), 3),
            }
            source = rng.choice(RETAIL_SOURCES)
        local = f"{_ascii(first)}.{_ascii(last)}.{n}".lower()
        yield SyntheticLead(
            email=f"{local}@{domain}",
            first_name=first,
            last_name=last,
            company=company,
            source=source,
            country=country,
            timezone=tz,
            attributes=attributes,
        )


def _ascii(text: str) -> str:
    table = str.maketrans("éèëöüóáíñç'", "eeeouoainc-")
    return text.translate(table).replace("-", "")


def insert_leads(engine: Engine, leads: list[SyntheticLead], now: datetime) -> int:
    """Insert generated leads (and their accounts) in two bulk statements."""
    if not leads:
        return 0
    with session_scope(engine) as session:
        names = sorted({lead.company for lead in leads if lead.company})
        if names:
            session.execute(
                insert_for(session, Account).on_conflict_do_nothing(index_elements=["domain"]),
                [
                    {
                        "name": n,
                        "domain": n.lower().replace(" ", "") + ".example",
                        "attributes": {},
                        "score": 0.0,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for n in names
                ],
            )
        ids = (
            dict(
                session.execute(
                    select(Account.name, Account.id).where(Account.name.in_(names))
                ).all()
            )
            if names
            else {}
        )
        rows = [
            {
                "email": lead.email,
                "first_name": lead.first_name,
                "last_name": lead.last_name,
                "account_id": ids.get(lead.company) if lead.company else None,
                "source": lead.source,
                "country": lead.country,
                "timezone": lead.timezone,
                "lifecycle_stage": "subscriber",
                "attributes": lead.attributes,
                "behaviour_score": 0.0,
                "fit_score": 0.0,
                "created_at": now,
                "updated_at": now,
            }
            for lead in leads
        ]
        stmt = insert_for(session, Lead).on_conflict_do_nothing(index_elements=["email"])
        return inserted(session, stmt, Lead.id, rows)
