"""Triton kernels of fusedlayers, one file per op family (``attention.py``, with its tile tables
and compile targets in ``attention_configs.py``; ``layer_norm.py``), and ``interpreter.py``:
what runs only under the Triton interpreter.

This folder is installed as ``fusedlayers.kernels`` (``package_dir`` in ``setup.py``); no
top-level ``kernels`` module is installed, so import it as ``fusedlayers.kernels``.
"""
