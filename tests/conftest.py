"""Suite-wide settings. Triton reads TRITON_INTERPRET when it is first imported (transformers can import
it early), so the interpreter is selected here, before any test module loads; kernels then run on CPU
tensors. Set TRITON_INTERPRET=0 explicitly to test on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def native_calls(monkeypatch):
    """The names of the native library's functions called during a test (``mopeq.compiler.native``), in order."""
    from mopeq.compiler import native

    calls, real = [], native.library()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(native, "library", lambda: Spy())
    return calls
