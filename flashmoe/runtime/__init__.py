"""The runtime: load a model directory onto a backend, the engine's forward pass and its state, the expert
store (pread, caches, eviction), memory budgets, statistics and traces."""
