"""Parameter accounting for Queryable LoRA models (METHOD.md section 5)."""

import math

from keras_qlora.layers import QueryableLoRAMixin
from keras_qlora.memory import AtomMemory
from keras_qlora.prior import InstructionPrior, is_state_variable


def _size(weights):
    unique = {id(w): w for w in weights if not is_state_variable(w)}
    return sum(math.prod(w.shape) for w in unique.values())


def _own_weights(layer):
    return layer._trainable_variables + layer._non_trainable_variables


def count_parameters(model):
    """Counts a model's parameters by part.

    Args:
        model: a Keras layer or model holding Queryable LoRA layers.

    Returns:
        A dict of ints: `adapters` (the `A` and `B` of every adapted layer),
        `memory` (atoms, keys, query, block and summary weights, without the
        prior), `prior`, `trainable` and `total` (all weights of `model`, each
        shared weight once), and the plain-LoRA counts at the same rank and
        targets: `lora_equivalent` in the PEFT convention `r (d_in + d_out)`
        (flattened input and output axes) and `keras_lora_equivalent` in the
        convention of Keras's `enable_lora` (all kernel axes but the last in
        `A`).
    """
    layers = model._flatten_layers(include_self=True, recursive=True)
    adapted = [l for l in layers if isinstance(l, QueryableLoRAMixin) and hasattr(l, "factorization")]
    memories = [l for l in layers if isinstance(l, AtomMemory)]
    priors = [l for l in layers if isinstance(l, InstructionPrior)]
    return {
        "adapters": _size([w for l in adapted for w in (l.qlora_a, l.qlora_b)]),
        "memory": _size([w for m in memories for w in _own_weights(m)]),
        "prior": _size([w for p in priors for w in _own_weights(p)]),
        "trainable": _size(model.trainable_weights),
        "total": _size(model.weights),
        "lora_equivalent": sum(l.factorization.lora_size for l in adapted),
        "keras_lora_equivalent": sum(l.factorization.keras_lora_size for l in adapted),
    }


def print_trainable_parameters(model):
    """Prints PEFT's summary line, then the breakdown of `count_parameters`."""
    counts = count_parameters(model)
    share = 100.0 * counts["trainable"] / max(counts["total"], 1)
    print(
        f"trainable params: {counts['trainable']:,} || all params: "
        f"{counts['total']:,} || trainable%: {share:.4f}"
    )
    print(
        f"  adapters: {counts['adapters']:,} | memory: {counts['memory']:,} | "
        f"prior: {counts['prior']:,} | plain LoRA at this rank: "
        f"{counts['lora_equivalent']:,} (PEFT convention), "
        f"{counts['keras_lora_equivalent']:,} (Keras enable_lora)"
    )
    return counts
