"""flashmoe: run Mixture-of-Experts models larger than memory by streaming routed experts from SSD."""

__version__ = "0.1.0"
