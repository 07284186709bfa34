"""Exactly-once delivery: claim, send over SMTP, record, and recover after a crash."""
