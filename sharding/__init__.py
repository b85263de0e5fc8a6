"""Parallelism applied from outside the models: process-group and thread set-up, one parallelize function per model."""
