"""The built-in pipeline: promotion writes to nurture's own tables and nothing leaves."""

from nurture.connectors.local.connector import LocalConnector

__all__ = ["LocalConnector"]
