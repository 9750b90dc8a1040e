"""Where the adapter's weights go under `keras.distribution.ModelParallel`.

Each adapted kernel is the matrix `(input axes, output axes)` split into
`A: input_axes + (r,)` and `B: (r,) + output_axes`. Sharded like the kernel
it adapts, `A` keeps the kernel's input-axis sharding and `B` its output-axis
sharding; the rank axis, and the shared memory, are replicated. So a
column-parallel projection (output axis sharded) computes `z = x A` locally
and shards only the small `B`, and a row-parallel one (input axis sharded)
shards `A` the same way as its kernel.
"""

import keras

from keras_qlora.factorization import factorize_layer
from keras_qlora.layers import ADAPTER_KEYS
from keras_qlora.retrofit import find_memory


def _adapter_axes(layer, kernel_axes):
    """`(a_axes, b_axes)` for a layer whose kernel is laid out as `kernel_axes`."""
    equation = factorize_layer(layer, 1).base_equation
    inputs, kernel = equation.split("->")[0].split(",")
    axis_of = dict(zip(kernel, kernel_axes))
    a_axes = tuple(axis_of[c] for c in kernel if c in inputs) + (None,)
    b_axes = (None,) + tuple(axis_of[c] for c in kernel if c not in inputs)
    return a_axes, b_axes


def layout_map(model, base_layout_map):
    """Adds the Queryable LoRA weights of `model` to a `keras.distribution.LayoutMap`.

    For every `Dense` or `EinsumDense` layer of `model` whose kernel has a
    layout in `base_layout_map` (adapted or not yet adapted), adds the
    layouts of its `A` (`qlora_a`, sharded like the kernel's input axes) and
    `B` (`qlora_b`, like its output axes), keyed by their exact variable
    paths; and, once `model` has an `AtomMemory`, a replicated layout for
    each of the memory's weights. Entries already in the map are kept.

    Under JAX, variables take their layout when they are created: call this
    on the base model, built inside the distribution, before
    `keras_qlora.enable` or `keras_qlora.adapt` create the adapter.

    Args:
        model: a Keras model or layer (a KerasHub backbone or task, or a
            model built from the adapted layers).
        base_layout_map: a `keras.distribution.LayoutMap` with the layouts
            of the base model's kernels (for a KerasHub backbone, its
            `get_layout_map(device_mesh)`).

    Returns:
        `base_layout_map`, with the entries added.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], keras.distribution.list_devices())
    layouts = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layouts))
    backbone = keras_hub.models.LlamaBackbone(...)
    keras_qlora.layout_map(backbone, layouts)
    keras_qlora.enable(backbone, rank=8)
    ```
    """
    if not isinstance(base_layout_map, keras.distribution.LayoutMap):
        raise ValueError(
            "`base_layout_map` must be a `keras.distribution.LayoutMap`. "
            f"Received: base_layout_map={base_layout_map!r}"
        )
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a Keras model or layer. Received: model={model!r}")

    def add(path, axes):
        # Not `path in base_layout_map`: its lookup matches regex keys and
        # answers `None` rather than raising, so `in` is always true.
        if path not in set(base_layout_map):
            base_layout_map[path] = axes

    for layer in model._flatten_layers(include_self=True):
        if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) or not layer.built:
            continue
        kernel = layer._kernel
        layout = base_layout_map[kernel.path]
        if layout is None:
            continue
        prefix = kernel.path.rpartition("/")[0]
        for key, axes in zip(ADAPTER_KEYS, _adapter_axes(layer, layout.axes)):
            add(f"{prefix}/{key}", axes)
    try:
        memory = find_memory(model)
    except ValueError:
        memory = None
    if memory is not None:
        for layer in memory._flatten_layers(include_self=True):
            for weight in layer.weights:
                add(weight.path, (None,) * len(weight.shape))
    return base_layout_map
