"""Salesforce REST constants (see docs/crm-apis.md)."""

from __future__ import annotations

LOGIN_URL = "https://login.salesforce.com"
API_VERSION = "v61.0"
TOKEN_PATH = "/services/oauth2/token"
BATCH_SIZE = 200  # records per composite sObject collection call
OBJECT = "Lead"
EXTERNAL_ID_FIELD = "Nurture_Id__c"  # a custom External ID field on Lead
COMPOSITE_UPSERT = "/services/data/{version}/composite/sobjects/{object}/{field}"
QUERY = "/services/data/{version}/query"
LIMIT_HEADER = "Sforce-Limit-Info"

# Our stage -> Lead.Status picklist value, and the statuses that mean something back.
STATUS = {"mql": "Open - Not Contacted", "sql": "Working - Contacted"}
STATUS_BACK = {
    "Open - Not Contacted": "mql",
    "Working - Contacted": "sql",
    "Closed - Converted": "opportunity",
    "Closed - Not Converted": "recycled",
}

# Opportunity StageName -> our stage; the Opportunity names its Lead in a custom field.
OPPORTUNITY_BACK = {"Closed Won": "customer", "Closed Lost": "recycled"}
OPPORTUNITY_LEAD_FIELD = "Nurture_Lead__c"

# Per-record errors worth another try; any other per-record error is fatal.
RETRYABLE_RECORD_ERRORS = frozenset({"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"})

DEFAULT_MAPPING = {
    "email": {"property": "Email", "transform": "lower"},
    "first_name": {"property": "FirstName", "transform": {"truncate": 40}},
    "last_name": {
        "property": "LastName",
        "transform": [{"default": "[not provided]"}, {"truncate": 80}],
    },
    "company": {
        "property": "Company",
        "transform": [{"default": "[not provided]"}, {"truncate": 255}],
    },
    "source": "LeadSource",
}
