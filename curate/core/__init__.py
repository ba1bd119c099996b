"""The kernel every stage stands on: errors, atomic writes, hashing, the uid contract, worker plumbing.

Imports nothing else of the project.
"""
