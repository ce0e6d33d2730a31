"""Sampling: the flow-ODE sampler, PNG grids and the imontage-sample command."""
