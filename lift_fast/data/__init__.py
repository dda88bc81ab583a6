"""Data: webdataset shards, the synthetic set, and loaders that join images with caption embeddings."""
