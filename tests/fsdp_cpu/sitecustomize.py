"""Test-only: lets accelerate's FSDP2 path run on CPU processes (gloo), so tests/test_fsdp.py can launch the real
scripts with an FSDP accelerate config exactly as users do. Imported automatically by Python (``sitecustomize``)
only when this folder is on ``PYTHONPATH``; tests/test_fsdp.py puts it there for its subprocesses. Nothing in the
package or the scripts imports it.

Why: accelerate 1.15 picks FSDP only for GPU-like backends. In ``AcceleratorState.__init__``
(accelerate/state.py, ~line 986: ``elif self.distributed_type in [DistributedType.MULTI_GPU, MULTI_MLU, ...,
MULTI_NEURON]``) the FSDP branch sits inside that list, and ``MULTI_CPU`` is not in it, so on CPU an FSDP config
silently becomes plain CPU DDP. torch's ``fully_shard`` itself runs on CPU over gloo. The patch does, for
MULTI_CPU only, what that branch does for GPUs (set ``distributed_type = FSDP``, hand the plugin its mixed
precision, keep the plugin), and nothing else: every later step (``prepare`` -> ``fully_shard``, sharded
``save_state`` / ``load_state``, ``get_state_dict``) is accelerate's own, unpatched.
"""

import importlib.abc
import importlib.machinery
import sys


def _patch(state_module) -> None:
    from accelerate.utils import DistributedType

    original = state_module.AcceleratorState.__init__
    if getattr(original, "_dmdx_fsdp_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the body of accelerate's FSDP branch (state.py ~line 1010), for MULTI_CPU
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            state_module.PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._dmdx_fsdp_cpu = True
    state_module.AcceleratorState.__init__ = __init__


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches ``accelerate.state`` right after it is imported (importing accelerate here would cost every
    process that starts with this folder on its path a torch import)."""

    def find_spec(self, name, path, target=None):
        if name != "accelerate.state":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _AfterImport())
