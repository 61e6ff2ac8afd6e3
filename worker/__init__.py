"""hypersearch worker: runs allow-listed training jobs from Redis and writes checkpoints."""
