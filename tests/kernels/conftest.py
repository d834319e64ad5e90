"""Kernel tests run the real Triton kernels on CPU through Triton's interpreter.

The interpreter is chosen by TRITON_INTERPRET=1, which must be set before triton (and so
twobp.kernels) is imported; tests/conftest.py does the same for the whole suite, this keeps
`pytest tests/kernels/...` right on its own.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
