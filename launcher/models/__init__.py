"""mlx-lm model files: found locally and on the Macs, checked on the hosts and pushed where missing."""
