"""Stateful fake CRM servers speaking each vendor's documented shapes (docs/crm-apis.md)."""
