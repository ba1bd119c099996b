"""The embed stage: open_clip image/text embeddings and CLIP scores for a pool, per shard, resumable."""
