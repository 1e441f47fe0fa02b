"""The online service (Ray Serve): built on the model bundle's ``Predictor``."""
