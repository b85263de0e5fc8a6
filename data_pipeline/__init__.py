"""Data for fmrl-trainer: the embedded synthetic catalog, leave-one-out splits, batch collation, and the
fsspec storage seam (local paths and S3-compatible object storage) that shard writers and checkpoints use."""
