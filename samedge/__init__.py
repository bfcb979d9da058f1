"""samedge: medical SAM adaptations from training checkpoint to validated edge engines.

The package is split so that the bedside runtime (``samedge.runtime``) needs only numpy and one
inference backend, while ``samedge.models`` and ``samedge.export`` carry the torch side.
"""

__version__ = "0.1.0"
