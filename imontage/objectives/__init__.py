"""Training objectives: one small module per stage objective."""
