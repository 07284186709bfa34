"""What a team writes: campaign, scoring and pipeline YAML, the rule language, the programme."""
