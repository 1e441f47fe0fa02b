"""Turning posters and metadata into model inputs: sources, the catalogue schema, genres."""
