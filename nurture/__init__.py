"""nurture: lead-nurturing automation for Prefect.

The core library: domain logic and persistence, in layers (see README's Layout and the
import-linter contracts in pyproject.toml). It never imports prefect; the flows in
``flows/`` orchestrate it, and the ``nurture`` command runs it directly.

The names below are the public API. They load on first use, so ``import nurture`` stays
cheap for the CLI and the spool recorder.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "NurtureError": "nurture.errors",
    "ConfigError": "nurture.errors",
    "Settings": "nurture.config",
    "get_settings": "nurture.config",
    "make_engine": "nurture.store.db",
    "upgrade": "nurture.store.db",
    "Programme": "nurture.spec.programme",
    "import_leads": "nurture.intake.leads",
    "EventIn": "nurture.engagement.events",
    "record_events": "nurture.engagement.events",
    "score_all": "nurture.engagement.scoring",
    "TickResult": "nurture.tick",
    "build_report": "nurture.reporting.report",
    "Connector": "nurture.crm",
    "load_connector": "nurture.crm",
}

__all__ = [
    "ConfigError",
    "Connector",
    "EventIn",
    "NurtureError",
    "Programme",
    "Settings",
    "TickResult",
    "__version__",
    "build_report",
    "get_settings",
    "import_leads",
    "load_connector",
    "make_engine",
    "record_events",
    "score_all",
    "upgrade",
]

if TYPE_CHECKING:
    from nurture.config import Settings, get_settings
    from nurture.crm import Connector, load_connector
    from nurture.engagement.events import EventIn, record_events
    from nurture.engagement.scoring import score_all
    from nurture.errors import ConfigError, NurtureError
    from nurture.intake.leads import import_leads
    from nurture.reporting.report import build_report
    from nurture.spec.programme import Programme
    from nurture.store.db import make_engine, upgrade
    from nurture.tick import TickResult


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nurture' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
