"""Leads come in: file import, normalisation and set-based upserts."""
