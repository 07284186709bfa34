"""The built-in pipeline: promotion writes to nurture's own tables and nothing leaves."""

from connectors.local.connector import LocalConnector

__all__ = ["LocalConnector"]
