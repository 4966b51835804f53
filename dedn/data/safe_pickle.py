"""Load numpy arrays from pickle files without running arbitrary code.

``*_attribute.pkl`` files of the DAZLE/MSDN/DEDN releases are pickled numpy arrays. A plain
``pickle.load`` would execute whatever a crafted file asks for; this unpickler resolves only the few
globals that rebuild an ndarray and refuses everything else.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import numpy as np

from dedn.errors import DednInputError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes from Python 3
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DednInputError(
            self.source, "pickle", f"only numpy arrays may be unpickled, refusing global {module}.{name}"
        )


def load_array_pickle(path: str | os.PathLike[str]) -> np.ndarray:
    """Load one numeric numpy array from a pickle; anything else raises DednInputError."""
    source = str(path)
    if not os.path.isfile(path):
        raise DednInputError(source, "file", "not found")
    with open(path, "rb") as f:
        try:
            obj = _ArrayUnpickler(f, source).load()
        except DednInputError:
            raise
        except Exception as e:  # malformed or truncated stream
            raise DednInputError(source, "pickle", f"not a readable pickle of a numpy array: {e}") from None
    if not isinstance(obj, np.ndarray):
        raise DednInputError(source, "pickle", f"must hold a numpy array, got {type(obj).__name__}")
    if not (np.issubdtype(obj.dtype, np.floating) or np.issubdtype(obj.dtype, np.integer)):
        raise DednInputError(source, "pickle", f"array must be numeric, got dtype {obj.dtype}")
    return obj


__all__ = ["load_array_pickle"]
