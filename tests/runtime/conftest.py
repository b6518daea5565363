"""Kernel tests run Triton's interpreter on CPU tensors; it must be selected before triton loads."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16_dot():
    """The interpreter's ``tl.dot`` multiplies bf16 operands as their uint16 bit patterns
    (triton/runtime/interpreter.py ``create_dot``, Triton 3.9); widen them to fp32 first."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_mopeq_bf16", False):
        return

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._mopeq_bf16 = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16_dot()
