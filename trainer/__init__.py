"""Training loop, configuration, metrics and CLI for fmrl-trainer."""
