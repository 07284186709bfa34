"""Prefect flows: thin orchestration over :mod:`nurture`, one task per batch.

Importing this package keeps Prefect offline and local unless told otherwise: its home
under ``.nurture/prefect``, no telemetry, and a startup timeout that fits a cold start.
"""

import os as _os

_os.environ.setdefault("PREFECT_HOME", _os.path.abspath(".nurture/prefect"))
_os.environ.setdefault("DO_NOT_TRACK", "1")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
