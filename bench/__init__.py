"""Benchmarks (not tests): disk bandwidth, kernels, and streaming decode at full scale; results go to docs/.
Mapped into the package as flashmoe.bench so that `flashmoe bench` can run them."""
