"""Checkpoint conversion: consolidate, export and import, inspect, verify (tools/convert_checkpoint.py)."""
