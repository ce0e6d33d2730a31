"""Fused Triton kernels, installed as ``imontage.kernels``.

The folder sits at the repository top level so kernel authors find it next to ``imontage/``;
setup.py installs it under the imontage namespace because ``kernels`` is an unrelated PyPI
distribution that other libraries import when it is present.
"""
