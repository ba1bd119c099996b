"""Filters: pure functions of a batch of pool rows and their parameters.

A filter knows nothing about files, DuckDB or Ray. The recipe runner (curate/run.py) decides how
rows are batched, where they are executed and how results are persisted. See filters/base.py.
"""
