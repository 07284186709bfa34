"""HubSpot CRM v3 constants (see docs/crm-apis.md)."""

from __future__ import annotations

BASE_URL = "https://api.hubapi.com"
BATCH_SIZE = 100  # inputs per batch call (unverified for v3: configurable)
SEARCH_LIMIT = 100  # results per search page
SEARCH_MAX_RESULTS = 10_000  # a search never pages past this many results

UPSERT_CONTACTS = "/crm/v3/objects/contacts/batch/upsert"
UPDATE_CONTACTS = "/crm/v3/objects/contacts/batch/update"
UPSERT_DEALS = "/crm/v3/objects/deals/batch/upsert"
ASSOCIATE_DEALS_CONTACTS = "/crm/v4/associations/deals/contacts/batch/associate/default"
SEARCH = "/crm/v3/objects/{object}/search"
PIPELINES = "/crm/v3/pipelines/deals"
GDPR_DELETE = "/crm/v3/objects/contacts/gdpr-delete"  # permanent, for erasure requests

DEAL_CONTACT_ASSOCIATION = 3  # HUBSPOT_DEFINED deal -> contact

# The unique-value custom deal properties that make deal writes idempotent.
DEAL_KEY_PROPERTY = "nurture_key"
DEAL_CONTACT_PROPERTY = "nurture_contact_id"

# Our lifecycle stage -> HubSpot's contact lifecyclestage internal value, and back.
LIFECYCLE = {
    "subscriber": "subscriber",
    "lead": "lead",
    "mql": "marketingqualifiedlead",
    "sql": "salesqualifiedlead",
    "opportunity": "opportunity",
    "customer": "customer",
}
LIFECYCLE_BACK = {v: k for k, v in LIFECYCLE.items()}

# Deal stages that mean something to nurture; other deal stages are not pulled back.
DEAL_STAGES_BACK = {"closedwon": "customer", "closedlost": "recycled"}

DEFAULT_MAPPING = {
    "email": {"property": "email", "transform": "lower"},
    "first_name": "firstname",
    "last_name": "lastname",
    "company": {"property": "company", "transform": {"truncate": 255}},
}
