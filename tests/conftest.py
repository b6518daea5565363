"""Suite-wide settings. Triton reads TRITON_INTERPRET when it is first imported (transformers can import
it early), so the interpreter is selected here, before any test module loads; kernels then run on CPU
tensors. Set TRITON_INTERPRET=0 explicitly to test on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
