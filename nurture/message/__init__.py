"""One email's bytes: templates, rendering, skeletons, tracking tokens, MIME."""
