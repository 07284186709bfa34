"""Prefect flows: thin orchestration over :mod:`nurture`; each tick stage and send batch a task.

Importing this package changes nothing in the environment: a team's Prefect profile,
home and telemetry settings are theirs. Only ``nurture demo`` (and ``make``) keep Prefect
local and offline (see :func:`nurture.flows.demo_cli.keep_prefect_local`).
"""
