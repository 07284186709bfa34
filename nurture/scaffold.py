"""``nurture init``: scaffold a team's own programme repository from the packaged starter.

The starter ships inside the package (``nurture/starter``), so a wheel install has it:
the example campaigns with ``scoring.yaml`` and ``pipeline.yaml``, the email templates,
a ``prefect.yaml`` whose deployments run the *installed* flows, a README for the
marketing team and ``.env.example``, written here from :class:`~nurture.config.Settings`
so it lists every setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from nurture.config import Settings
from nurture.errors import NurtureError

STARTER = Path(__file__).resolve().parent / "starter"
STARTER_CAMPAIGNS = STARTER / "campaigns"
STARTER_TEMPLATES = STARTER / "templates" / "emails"

# Files of the starter copied under another name (a leading dot does not survive every
# packaging tool, and the starter's own README must not be taken for the package's).
_RENAMED = {"gitignore": ".gitignore", "programme-README.md": "README.md"}

# What each setting means, for .env.example. A test checks that every Settings field has
# an entry, so a new setting cannot ship undocumented.
SETTING_MEANINGS: dict[str, str] = {
    "database_url": "SQLAlchemy URL of the nurture database (SQLite file or PostgreSQL).",
    "smtp_url": "Where mail goes: smtp://user:pass@host:port, smtp+starttls://, smtps://.",
    "from_address": "The From header of every message, e.g. Acme <hello@acme.example>.",
    "secret_key": (
        "Signs tracking and unsubscribe links; a long random secret. Several, comma-separated, "
        "rotate keys: the first signs, all verify."
    ),
    "environment": "Set to development only on a development machine (allows the demo key).",
    "tracking_url": "Public base URL of the tracking service (`nurture serve`).",
    "imap_url": "imap://user:pass@host:port/INBOX: the mailbox read for replies and bounces.",
    "webhook_secret": (
        "Shared webhook secret: the webhook connector signs its POSTs with it, and the "
        "tracking service checks the signature of webhooks sent to it."
    ),
    "ingest_keys": "Comma-separated bearer keys allowed to POST /events to the tracking service.",
    "tracking_max_body": "Largest request body (bytes) the tracking service accepts.",
    "spool_dir": "Folder of the tracking service's durable event spool.",
    "spool_recorder": "Who records the spool: process (a child of nurture serve) or thread.",
    "alert_webhooks": "Sales alert channels: name=https://hook URL pairs, comma-separated.",
    "campaigns": "Folder of campaign YAML, scoring.yaml and pipeline.yaml (relative: cwd).",
    "templates": "Folder of the email templates (relative: the working directory).",
    "batch_size": "Leads per batch when rendering and sending.",
    "smtp_connections": "SMTP connections one tick sends over in parallel.",
    "skeletons": "Compose from per-template skeletons checked against Jinja (false: Jinja).",
    "max_per_second": "Sending cap, messages per second (empty: no cap).",
    "max_per_domain_per_second": "Sending cap per recipient domain, messages per second.",
    "tick_seconds": "The tick interval the sending budgets are computed for (seconds).",
    "crm_park_after": "How long a CRM push may keep failing retryably before it parks (7d).",
}

# The connectors' own settings (read by each connector, not by Settings).
CONNECTOR_SETTINGS: dict[str, str] = {
    "NURTURE_HUBSPOT_TOKEN": "HubSpot private-app token.",
    "NURTURE_HUBSPOT_PIPELINE": "HubSpot deal pipeline for promoted leads (empty: no deals).",
    "NURTURE_HUBSPOT_DEAL_STAGE": "HubSpot deal stage new deals start in.",
    "NURTURE_HUBSPOT_BASE_URL": "HubSpot API base URL (a sandbox or proxy).",
    "NURTURE_SALESFORCE_CLIENT_ID": "Salesforce connected app client id.",
    "NURTURE_SALESFORCE_CLIENT_SECRET": "Salesforce connected app client secret.",
    "NURTURE_SALESFORCE_LOGIN_URL": "Salesforce login URL (test.salesforce.com: a sandbox).",
    "NURTURE_SALESFORCE_INSTANCE_URL": "Salesforce instance URL, overriding the token's.",
    "NURTURE_SALESFORCE_OPPORTUNITY_STAGE": "Opportunity stage for promoted leads.",
    "NURTURE_PIPEDRIVE_TOKEN": "Pipedrive API token.",
    "NURTURE_PIPEDRIVE_PIPELINE_ID": "Pipedrive pipeline for promoted leads' deals.",
    "NURTURE_PIPEDRIVE_STAGE_ID": "Pipedrive stage new deals start in.",
    "NURTURE_PIPEDRIVE_CREATE_LEAD": "true: create a Pipedrive lead instead of a deal.",
    "NURTURE_PIPEDRIVE_BASE_URL": "Pipedrive API base URL (a sandbox or proxy).",
    "NURTURE_WEBHOOK_URL": "Where the webhook connector POSTs promoted leads.",
    "NURTURE_CRM_MAPPING": "YAML file of CRM field mapping rules (every connector).",
    "PREFECT_API_URL": "The Prefect server's API, e.g. http://prefect.internal:4200/api.",
}


def env_example() -> str:
    """The text of ``.env.example``: every setting, its meaning and its default."""
    lines = [
        "# nurture settings. Copy to .env (never commit it) or set them in the workers'",
        "# environment; credentials may live in Prefect blocks instead (README.md).",
        "",
    ]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        variable = alias if isinstance(alias, str) else f"NURTURE_{name.upper()}"
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = ""  # never print a secret default, not even the development key
        lines.append(f"# {SETTING_MEANINGS[name]}")
        lines.append(f"{variable}={'' if default is None else default}")
        lines.append("")
    lines.append("# CRM connectors (only the ones your campaigns promote to).")
    for variable, meaning in CONNECTOR_SETTINGS.items():
        lines.append(f"# {meaning}")
        lines.append(f"{variable}=")
    return "\n".join(lines) + "\n"


def _starter_files() -> Iterator[tuple[Path, Path]]:
    """(source, path relative to the programme) for every file of the starter."""
    # os.walk, not Path.rglob: in a checkout the starter's folders are symlinks to the
    # repository's campaigns/ and templates/, which rglob does not enter before 3.13.
    found = []
    for folder, dirs, files in os.walk(STARTER, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [Path(folder, name) for name in files]
    for source in sorted(found):
        relative = source.relative_to(STARTER)
        yield source, relative.with_name(_RENAMED.get(relative.name, relative.name))


def plan_programme(dest: Path) -> dict[Path, bytes]:
    """Every file ``nurture init`` writes into ``dest`` (relative path -> content)."""
    files = {relative: source.read_bytes() for source, relative in _starter_files()}
    files[Path(".env.example")] = env_example().encode()
    return files


def init_programme(dest: Path) -> list[Path]:
    """Scaffold a programme repository in ``dest``; returns the files written, relative.

    Nothing is written unless every file is new: an existing file (or a folder where a
    file goes) is never overwritten.

    Raises:
        NurtureError: ``dest`` is a file, or some of the files already exist (all named).
    """
    if dest.exists() and not dest.is_dir():
        raise NurtureError(f"{dest} exists and is not a folder")
    files = plan_programme(dest)
    taken = sorted(str(p) for p in files if (dest / p).exists() or (dest / p).is_symlink())
    if taken:
        shown = ", ".join(taken[:10]) + (f" and {len(taken) - 10} more" if len(taken) > 10 else "")
        raise NurtureError(f"{dest}: refusing to overwrite existing files: {shown}")
    for relative, content in files.items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        # "x": fail rather than clobber a file that appeared since the check above.
        with target.open("xb") as out:
            out.write(content)
    return sorted(files)
