"""Build a module tree whose parameters live on the meta device and whose buffers are real.

The runtime fills every parameter from an artifact's shards (``load_state_dict(assign=True)``), so
allocating them while the model is built would only cost memory: a layer's dense experts, the whole
model at once for families that build in float32. A plain ``torch.device("meta")`` context would
also leave the non-persistent buffers (rotary ``inv_freq``, ``position_ids``) on meta, and those are
not in the artifact. Inside ``empty_weights()`` the factories that make parameters (``torch.empty``,
``zeros``, ``ones``, ``full``, ``rand``, ``randn``), called without a device, return meta tensors;
every other op (``arange``, ``tensor``, arithmetic) runs for real, so buffers computed from them are
real; a parameter registered off meta is moved there. Like accelerate's
``init_empty_weights(include_buffers=False)``, without allocating a parameter first. A non-persistent
buffer made by one of those factories would stay on meta: ``meta_buffers`` names it, and the loader
refuses such a family in one line (no family in the tests has one; rotary and position buffers
come from ``arange``).

Example::

    with empty_weights():
        model = AutoModelForCausalLM.from_config(config)   # parameters on meta, inv_freq real
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.overrides import TorchFunctionMode

PARAMETER_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}


class _MetaFactories(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PARAMETER_FACTORIES and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _parameter_to_meta(module: nn.Module, name: str, param):
    if param is not None and not param.is_meta:
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    return None


@contextmanager
def empty_weights():
    """Parameters built inside are on meta (never allocated); buffers are real (see the module docstring)."""
    hook = torch_module.register_module_parameter_registration_hook(_parameter_to_meta)
    try:
        with _MetaFactories():
            yield
    finally:
        hook.remove()


def meta_buffers(model: nn.Module) -> list[str]:
    """Non-persistent buffers left on meta (made by a parameter factory); the artifact cannot fill them."""
    persistent = set(model.state_dict())
    return [name for name, b in model.named_buffers() if b.is_meta and name not in persistent]
