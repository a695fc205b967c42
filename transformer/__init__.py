"""Reference Transformer built on fusedlayers; see issue #7.

This folder is installed as ``fusedlayers.transformer`` (``package_dir`` in ``setup.py``); no
top-level ``transformer`` module is installed, so import it as ``fusedlayers.transformer``.
"""
