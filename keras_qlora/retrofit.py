"""`enable`: Queryable LoRA on an existing Keras (or KerasHub) backbone, in place."""

import math

import keras

from keras_qlora.factorization import factorize_layer
from keras_qlora.layers import QueryableLoRAMixin, _check_adapter_args, adapt
from keras_qlora.memory import AtomMemory

DEFAULT_TARGETS = ("query_dense", "value_dense", "query", "value")
_BLOCK_ATTRIBUTES = ("transformer_layers", "decoder_layers", "encoder_layers", "blocks")
_MEMORY_ATTRIBUTE = "_keras_qlora_memory"


def find_blocks(backbone):
    """The backbone's transformer blocks, in depth order.

    Looks for `transformer_layers` (KerasHub's name, in 31 backbones), then
    `decoder_layers`, `encoder_layers` and `blocks`.
    """
    for name in _BLOCK_ATTRIBUTES:
        blocks = getattr(backbone, name, None)
        if isinstance(blocks, (list, tuple)) and blocks and all(
            isinstance(b, keras.layers.Layer) for b in blocks
        ):
            return list(blocks)
    found = sorted(
        f"{name} ({type(value).__name__})"
        for name, value in vars(backbone).items()
        if isinstance(value, (list, tuple, keras.layers.Layer)) and not name.startswith("__")
    )
    raise ValueError(
        f"Found no list of transformer blocks on `backbone` (looked for "
        f"{list(_BLOCK_ATTRIBUTES)}). Its layer attributes are: {found}. "
        f"Received: backbone={type(backbone).__name__}"
    )


def get_memory(backbone):
    """The `AtomMemory` that `enable` attached to `backbone`, or `None`."""
    return getattr(backbone, _MEMORY_ATTRIBUTE, None)


def _targets(block, target_layer_names, exclude):
    found = []
    for layer in block._flatten_layers(include_self=False):
        if layer.name in target_layer_names and layer.name not in exclude:
            if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
                raise TypeError(
                    f"Target layer '{layer.name}' of block '{block.name}' is a "
                    f"{type(layer).__name__}; Queryable LoRA adapts `Dense` and "
                    f"`EinsumDense` layers. Received: target_layer_names={list(target_layer_names)}"
                )
            found.append(layer)
    return found


def enable(
    backbone,
    rank=8,
    num_atoms=32,
    block_size=1,
    target_layer_names=None,
    exclude=(),
    layers_to_transform=None,
    lora_alpha=None,
    rslora=False,
    **memory_kwargs,
):
    """Adds Queryable LoRA adapters to a backbone's transformer blocks, in place.

    Walks the backbone's blocks in depth order (`transformer_layers` for
    KerasHub backbones), groups every `block_size` consecutive blocks into one
    routing block, and adapts the target projections of each, all sharing one
    new `AtomMemory`. Every base weight of the backbone is frozen, biases
    included (unlike Keras's own `enable_lora`); only the adapters, the memory
    and its prior train. Base weights keep their objects and variable paths,
    so a checkpoint of the base backbone still loads. If an argument is
    rejected, the backbone is left unchanged.

    Args:
        backbone: a built Keras model with a list of transformer blocks.
        rank: int. Adapter rank `r`. Defaults to `8`.
        num_atoms: int. Atoms in the shared memory. Defaults to `32`.
        block_size: int. Transformer blocks per routing block. Defaults to `1`.
        target_layer_names: list of str. Names of the layers to adapt,
            matched exactly inside every block (KerasHub's convention).
            Defaults to KerasHub's query and value projections
            (`"query_dense"`, `"value_dense"`, `"query"`, `"value"`).
        exclude: list of str. Layer names never adapted. Defaults to none.
        layers_to_transform: list of int or `None`. Indices of the transformer
            blocks to adapt; `None` adapts all.
        lora_alpha, rslora: scaling, as in `QueryableLoRADense`.
        **memory_kwargs: other `AtomMemory` arguments (`top_k`, `summary`,
            `routing`, `key_dim`, `summary_dim`, `temperature`, `prior`, ...).

    Returns:
        The shared `AtomMemory` (also `keras_qlora.get_memory(backbone)`).
    """
    if get_memory(backbone) is not None:
        raise ValueError(
            f"Queryable LoRA is already enabled on this backbone. Received: backbone={backbone.name!r}"
        )
    if not backbone.built:
        raise ValueError(f"`backbone` must be built before `enable`. Received: backbone={backbone.name!r}")
    blocks = find_blocks(backbone)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer. Received: block_size={block_size!r}")
    target_layer_names = tuple(DEFAULT_TARGETS if target_layer_names is None else target_layer_names)
    if isinstance(exclude, str):
        exclude = (exclude,)
    indices = range(len(blocks)) if layers_to_transform is None else layers_to_transform
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if bad or not indices:
        raise ValueError(
            f"`layers_to_transform` must list block indices in [0, {len(blocks)}). "
            f"Received: layers_to_transform={layers_to_transform!r}"
        )
    memory = AtomMemory(
        num_atoms=num_atoms,
        rank=rank,
        num_blocks=math.ceil(len(blocks) / block_size),
        name="qlora_memory",
        **memory_kwargs,
    )
    plan = []
    for index in sorted(set(indices)):
        for layer in _targets(blocks[index], target_layer_names, exclude):
            if isinstance(layer, QueryableLoRAMixin):
                raise ValueError(f"Layer '{layer.name}' is already adapted. Received: backbone={backbone.name!r}")
            factorize_layer(layer, rank)  # raises on kernels that cannot be factorized
            plan.append((layer, index // block_size))
    if not plan:
        available = sorted({l.name for l in blocks[0]._flatten_layers(include_self=False) if l.weights})
        raise ValueError(
            f"No layer of the transformer blocks matches `target_layer_names`. Layer "
            f"names in block 0: {available}. Received: target_layer_names="
            f"{list(target_layer_names)}, exclude={list(exclude)}"
        )
    for _, block in plan:
        _check_adapter_args(memory, None, block, lora_alpha, rslora)

    for weight in backbone.weights:
        weight.trainable = False
    for layer, block in plan:
        adapt(layer, memory, block=block, lora_alpha=lora_alpha, rslora=rslora)
    object.__setattr__(backbone, _MEMORY_ATTRIBUTE, memory)
    return memory
