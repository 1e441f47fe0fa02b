"""posterfusion: movie genres from posters, fused with object detections and metadata, on Ray.

The stages live in their own subpackages (``posterfusion.cluster``, ``.features``,
``.models``, ``.jobs``, ``.serving``); importing this package does no work.
"""

__version__ = "0.1.0"
