"""Consent records, capture, the preference centre, erasure, export and retention."""
