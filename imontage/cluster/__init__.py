"""Running imontage on clusters: SLURM job scripts and submission."""
