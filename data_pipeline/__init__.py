"""Data for fmrl-trainer: the embedded synthetic catalog, leave-one-out splits and batch collation."""
