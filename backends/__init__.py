"""Compute backends behind one small interface (backends/base.py), chosen by name with ``--backend``.

Each backend is registered with a loader so its optional dependencies are imported only when it is chosen.
"""

from flashmoe.backends.base import (
    Backend,
    BackendError,
    PackedWeight,
    available_backends,
    get_backend,
    register,
)


def _numpy():
    from flashmoe.backends.numpy_backend import NumpyBackend

    return NumpyBackend


def _numba():
    from flashmoe.backends.numba_backend import NumbaBackend

    return NumbaBackend


def _mlx():
    from flashmoe.backends.mlx_backend import MlxBackend

    return MlxBackend


def _cuda():
    from flashmoe.backends.cuda_backend import CudaBackend

    return CudaBackend


register("numpy", _numpy)
register("numba", _numba)
register("mlx", _mlx)
register("cuda", _cuda)

__all__ = ["Backend", "BackendError", "PackedWeight", "available_backends", "get_backend", "register"]
