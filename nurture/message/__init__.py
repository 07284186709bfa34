"""One email's bytes: templates, rendering, tracking tokens, MIME, render workers."""
