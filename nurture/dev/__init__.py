"""The demo's and the tests' support (SMTP sink, simulator, synthetic leads). Never imported by the core."""
