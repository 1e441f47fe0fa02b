"""The pipeline's jobs, one module per stage, and the ``posterfusion`` CLI that runs them."""
