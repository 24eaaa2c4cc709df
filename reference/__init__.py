"""The readable NumPy reference forward pass (imported as flashmoe.reference): the definition of every
block that backends implement and the conformance suite checks against."""

from flashmoe.reference.model import Cache, ReferenceModel

__all__ = ["Cache", "ReferenceModel"]
