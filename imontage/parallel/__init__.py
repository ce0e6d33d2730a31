"""Parallelism applied to single-device models from outside: process groups, collectives, parallelize."""
