"""Reproducible workloads that print ratios against floors."""
