"""Backbones, the fusion network, the model bundle and its Predictor."""
