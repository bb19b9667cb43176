"""Modeling: backbones, feature caches, the training loop with its folds, checkpoints."""
