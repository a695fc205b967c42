"""Triton kernels of fusedlayers, one file per op family; see issue #3/#4.

This folder is installed as ``fusedlayers.kernels`` (``package_dir`` in ``setup.py``); no
top-level ``kernels`` module is installed, so import it as ``fusedlayers.kernels``.
"""
