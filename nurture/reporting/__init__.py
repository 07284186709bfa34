"""The funnel and analytics report, its charts, statistics and the explain view."""
