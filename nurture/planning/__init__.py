"""Campaigns as code: a plan of what a change will do, and a replay against history."""
