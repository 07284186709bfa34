"""Pipedrive constants (see docs/crm-apis.md)."""

from __future__ import annotations

BASE_URL = "https://api.pipedrive.com"  # or https://{company}.pipedrive.com
PERSONS = "/api/v2/persons"
PERSON = "/api/v2/persons/{id}"
PERSON_SEARCH = "/api/v2/persons/search"
DEALS = "/api/v2/deals"
LEADS = "/api/v1/leads"  # leads are on v1 only
PAGE_LIMIT = 500  # v2 cursor pages hold at most 500 items

# Deal status -> our stage; an open deal's stage is the one we put it in.
STATUS_BACK = {"won": "customer", "lost": "recycled"}

DEFAULT_MAPPING = {
    "email": {"property": "email", "transform": "lower"},
    "first_name": "first_name",
    "last_name": "last_name",
}
