"""Pools: reading one safely, downloading one, verifying it, serving it, DataComp's format, the offline builder."""
