"""Libraries the filters and stages share that are not stages: the FAISS index choice and offline WordNet."""
