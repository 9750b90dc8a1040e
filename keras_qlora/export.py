"""Serving without routing: freeze the routing, fold the adapter into the kernels.

Where the routing can be fixed (one instruction, or one operating regime),
the routed operator of each adapted layer becomes a constant `R = sum_m
alpha_m U_m`, the adapter a static LoRA `s A R B`, and that update can be
added to the frozen kernel. The result is a plain model of the base class,
with no adapter and no routing cost. Freezing is an approximation whenever
the routing varied with the input; `calibrate_routing` measures the routing
to freeze on data the model will see, and the regression study reports
what the freezing costs.
"""

import numpy as np
from keras import ops

from keras_qlora.adapter_io import _backbone_of
from keras_qlora.layers import QueryableLoRAMixin
from keras_qlora.prior import is_state_variable
from keras_qlora.retrofit import find_memory, get_memory


def _adapted(model):
    return [l for l in model._flatten_layers(include_self=True) if isinstance(l, QueryableLoRAMixin)]


def calibrate_routing(model, x):
    """Mean routing weights of every adapted layer over the positions of `x`.

    Runs `model(x)` once, eagerly, and averages each layer's routing weights
    over the batch and positions (positions where `x["padding_mask"]` is
    false are left out). Route under an instruction by calling it inside
    `keras_qlora.use_instruction(model, e)`.

    Args:
        model: an adapted model (a KerasHub task or backbone after `enable`).
        x: one batch of model inputs.

    Returns:
        A dict from each adapted layer to its mean routing weights, a float32
        NumPy array `(num_atoms,)` summing to 1.
    """
    memory = find_memory(model)
    mask = x.get("padding_mask") if isinstance(x, dict) else None
    with memory.capture_routing() as records:
        model(x)
    means = {}
    for record in records:
        alpha = ops.convert_to_numpy(record["alpha"]).astype("float64")
        alpha = alpha.reshape(-1, alpha.shape[-1])
        if mask is not None and np.size(mask) == alpha.shape[0]:
            weights = np.asarray(mask, "float64").reshape(-1, 1)
            mean = (alpha * weights).sum(0) / max(weights.sum(), 1.0)
        else:
            mean = alpha.mean(0)
        means[record["caller"]] = mean.astype("float32")
    missing = [l.name for l in _adapted(model) if l not in means]
    if missing:
        raise ValueError(f"`model(x)` did not call the adapted layers {missing}. Received: x of type {type(x).__name__}")
    return means


def kernel_update(layer, alpha):
    """The static update `s A (sum_m alpha_m U_m) B` of one adapted layer, in
    the kernel's shape (float32)."""
    alpha = ops.convert_to_tensor(np.asarray(alpha, "float32"))
    routed = ops.einsum("m,mij->ij", alpha, layer.memory.atoms)
    update = ops.einsum(layer.factorization.kernel_update_equation, layer.qlora_a, routed, layer.qlora_b)
    return update * layer.lora_scale


def _base_weights(model):
    adapter = set()
    for layer in _adapted(model):
        adapter |= {id(layer.qlora_a), id(layer.qlora_b)}
    memory = find_memory(model)
    adapter |= {id(w) for w in memory.weights}
    return [w for w in model.weights if id(w) not in adapter and not is_state_variable(w)]


def merge_adapter(model, routing):
    """A copy of `model` without adapters, each update folded into its kernel.

    Args:
        model: a KerasHub task or backbone after `keras_qlora.enable`.
        routing: the routing to freeze: a dict from adapted layer to mean
            routing weights (`calibrate_routing`), or one `(num_atoms,)`
            array for every layer.

    Returns:
        A new model of the base classes (no `keras_qlora` layer in it) whose
        kernels are `W + s A R B`. `model` is not changed.
    """
    backbone = _backbone_of(model)
    if get_memory(backbone) is None:
        raise ValueError(
            "`merge_adapter` takes a model after `keras_qlora.enable`. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    memory = get_memory(backbone)
    layers = _adapted(backbone)
    if not isinstance(routing, dict):
        routing = {layer: routing for layer in layers}
    for layer in layers:
        alpha = np.asarray(routing.get(layer, np.zeros(0)), "float32")
        if alpha.shape != (memory.num_atoms,) or not np.isclose(alpha.sum(), 1.0, atol=1e-4) or (alpha < 0).any():
            raise ValueError(
                f"`routing` must give every adapted layer {memory.num_atoms} non-negative "
                f"weights summing to 1. Received: for layer '{layer.name}' {alpha!r}"
            )
        if getattr(layer, "quantization_mode", None):
            raise ValueError(
                f"Cannot fold an update into the {layer.quantization_mode}-quantized kernel of "
                f"'{layer.name}'. Received: model={model.name!r}"
            )
    config = backbone.get_config()
    config.pop("keras_qlora", None)
    plain = type(backbone)._keras_qlora_base.from_config(config)
    merged = plain
    if model is not backbone:
        task_config = model.get_config()
        task_config["backbone"] = plain
        task_config["preprocessor"] = getattr(model, "preprocessor", None)
        merged = type(model).from_config(task_config)
    old, new = _base_weights(model), merged.weights
    if [(w.name, tuple(w.shape)) for w in old] != [(w.name, tuple(w.shape)) for w in new]:
        raise ValueError(
            "The rebuilt base model's weights do not line up with the adapted "
            f"model's; cannot merge. Received: model={model.name!r}"
        )
    position = {id(w): i for i, w in enumerate(old)}
    for source, target in zip(old, new):
        target.assign(source)
    for layer in layers:
        target = new[position[id(layer._kernel)]]
        update = kernel_update(layer, routing[layer])
        target.assign(ops.cast(ops.cast(layer._kernel, "float32") + update, target.dtype))
    return merged
