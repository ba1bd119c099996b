"""The reshard stage: a subset's samples copied from the pool into balanced webdataset shards."""
