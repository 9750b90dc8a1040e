"""keras_qlora: Queryable LoRA for Keras 3 on TensorFlow, PyTorch and JAX.

Queryable LoRA (arXiv 2605.08423) replaces each layer's fixed low-rank update
with one routed through a memory of `r x r` update atoms shared by all
adapted layers. It is not the quantized "QLoRA" of Dettmers et al.
"""

from keras_qlora.adapter_io import load_adapter, read_adapter, save_adapter
from keras_qlora.distribution import layout_map
from keras_qlora.export import calibrate_routing, kernel_update, merge_adapter
from keras_qlora.factorization import Factorization, factorize_equation
from keras_qlora.layers import QueryableLoRADense, QueryableLoRAEinsumDense, adapt
from keras_qlora.memory import AtomMemory, IdentityNoise, OrthogonalAtoms
from keras_qlora.params import count_parameters, print_trainable_parameters
from keras_qlora.prior import InstructionPrior
from keras_qlora.instructions import InstructedModel, embed_instructions, use_instruction
from keras_qlora.retrofit import disable_adapter, enable, find_blocks, find_memory, get_memory, plan
from keras_qlora.version import __version__

__all__ = [
    "AtomMemory",
    "Factorization",
    "IdentityNoise",
    "InstructedModel",
    "InstructionPrior",
    "OrthogonalAtoms",
    "QueryableLoRADense",
    "QueryableLoRAEinsumDense",
    "__version__",
    "adapt",
    "calibrate_routing",
    "count_parameters",
    "disable_adapter",
    "embed_instructions",
    "enable",
    "find_blocks",
    "find_memory",
    "get_memory",
    "kernel_update",
    "layout_map",
    "load_adapter",
    "merge_adapter",
    "read_adapter",
    "save_adapter",
    "factorize_equation",
    "plan",
    "print_trainable_parameters",
    "use_instruction",
]
