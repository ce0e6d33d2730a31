"""Training: trainer loop, checkpoint store."""
