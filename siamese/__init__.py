"""siamese: train siamese CNNs for image similarity, export them, index a catalog and query it."""

from siamese.errors import SiameseError

__version__ = "0.1.0"
__all__ = ["SiameseError", "__version__"]
