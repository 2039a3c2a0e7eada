"""Training: config, dataset, buckets, captions, cache, objectives and the training loop."""
