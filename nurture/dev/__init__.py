"""The demo's and the tests' support: SMTP sink, simulator, synthetic leads, web server.

Never imported by the production core (an import-linter contract in pyproject.toml).
"""
