"""What recipients do and what it is worth: events, tracking, inbox, people vs machines, scores."""
