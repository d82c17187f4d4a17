"""Benchmarks, run as scripts (``python bench/<name>.py``; each file's docstring says how).

A package so that tests import them by name (``from bench import scale_out``); they import only
``hybrid_megatron`` and the standard library, so they run as scripts from anywhere.
"""
