"""Models trained by imontage."""
