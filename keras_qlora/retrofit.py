"""`enable`: Queryable LoRA on an existing Keras (or KerasHub) backbone, in place."""

import contextlib
import importlib
import math

import keras

from keras_qlora._validation import check_positive_int
from keras_qlora.factorization import factorize_layer
from keras_qlora.layers import QueryableLoRAMixin, _check_adapter_args, adapt, check_adaptable
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


def _is_name_list(value):
    return isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value)


def _check_enable_args(backbone, blocks, block_size, target_layer_names, exclude, layers_to_transform):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer. Received: block_size={block_size!r}")
    if not _is_name_list(target_layer_names):
        raise ValueError(
            "`target_layer_names` must be a list of layer names. "
            f"Received: target_layer_names={target_layer_names!r}"
        )
    if not (isinstance(exclude, str) or _is_name_list(exclude)):
        raise ValueError(f"`exclude` must be a list of layer names. Received: exclude={exclude!r}")
    indices = range(len(blocks)) if layers_to_transform is None else layers_to_transform
    if not isinstance(indices, (range, list, tuple)):
        raise ValueError(
            f"`layers_to_transform` must be a list of block indices or None. "
            f"Received: layers_to_transform={layers_to_transform!r}"
        )
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if bad or not indices:
        raise ValueError(
            f"`layers_to_transform` must list block indices in [0, {len(blocks)}). "
            f"Received: layers_to_transform={layers_to_transform!r}"
        )
    return sorted(set(indices))


def plan(backbone, rank, block_size=1, target_layer_names=None, exclude=(), layers_to_transform=None):
    """The layers `enable` would adapt, without changing anything.

    Returns:
        A list of `(layer, block, factorization)`, in depth order.
    """
    if not isinstance(backbone, keras.layers.Layer):
        raise ValueError(f"`backbone` must be a Keras model. Received: backbone={backbone!r}")
    if not backbone.built:
        raise ValueError(f"`backbone` must be built before `enable`. Received: backbone={backbone.name!r}")
    check_positive_int("rank", rank)
    blocks = find_blocks(backbone)
    if target_layer_names is None:
        target_layer_names = DEFAULT_TARGETS
    indices = _check_enable_args(backbone, blocks, block_size, target_layer_names, exclude, layers_to_transform)
    target_layer_names = tuple(target_layer_names)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    found = []
    for index in indices:
        for layer in _targets(blocks[index], target_layer_names, exclude):
            check_adaptable(layer)
            # Raises on kernels that cannot be factorized.
            found.append((layer, index // block_size, factorize_layer(layer, rank)))
    if not found:
        available = sorted({l.name for l in blocks[0]._flatten_layers(include_self=False) if l.weights})
        raise ValueError(
            f"No layer of the transformer blocks matches `target_layer_names`. Layer "
            f"names in block 0: {available}. Received: target_layer_names="
            f"{list(target_layer_names)}, exclude={list(exclude)}"
        )
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

    The backbone's class becomes a subclass of itself (same name) whose
    config records these arguments, so a task model saved to a `.keras` file
    loads back with its adapters (`keras.saving.load_model`, with
    `keras_qlora` imported). `keras_qlora.save_adapter` writes the adapter
    alone.

    Compiled functions (`predict`, `fit`, KerasHub's `generate`) traced
    before `enable` would keep running the model without adapters on
    TensorFlow: pass the task itself (`enable(lm)`, which adapts
    `lm.backbone` and drops the task's compiled functions), or call
    `compile` on the task after `enable`.

    Args:
        backbone: a built Keras model with a list of transformer blocks, or a
            task holding one as `backbone` (a KerasHub `CausalLM`, ...).
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

    Example:

    ```python
    lm = keras_hub.models.Llama3CausalLM.from_preset(folder)
    keras_qlora.enable(lm.backbone, rank=8, num_atoms=32)
    keras_qlora.print_trainable_parameters(lm)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3))
    lm.fit(data)
    ```
    """
    task = None
    if isinstance(getattr(backbone, "backbone", None), keras.layers.Layer):
        task, backbone = backbone, backbone.backbone
    if get_memory(backbone) is not None:
        raise ValueError(
            f"Queryable LoRA is already enabled on this backbone. Received: backbone={backbone.name!r}"
        )
    if "num_blocks" in memory_kwargs or "name" in memory_kwargs:
        raise ValueError(
            "`enable` sets the memory's `num_blocks` and `name` itself. Received: "
            f"{ {k: memory_kwargs[k] for k in ('num_blocks', 'name') if k in memory_kwargs} }"
        )
    found = plan(backbone, rank, block_size, target_layer_names, exclude, layers_to_transform)
    target_layer_names = list(DEFAULT_TARGETS if target_layer_names is None else target_layer_names)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    memory = AtomMemory(
        num_atoms=num_atoms,
        rank=rank,
        num_blocks=math.ceil(len(find_blocks(backbone)) / block_size),
        name="qlora_memory",
        **memory_kwargs,
    )
    for _, block, _ in found:
        _check_adapter_args(memory, None, block, lora_alpha, rslora)
    config = {
        "rank": rank,
        "num_atoms": num_atoms,
        "block_size": block_size,
        "target_layer_names": target_layer_names,
        "exclude": exclude,
        "layers_to_transform": None if layers_to_transform is None else sorted(set(layers_to_transform)),
        "lora_alpha": lora_alpha,
        "rslora": rslora,
        **{k: v for k, v in memory.get_config().items() if k not in _NOT_MEMORY_KWARGS},
    }

    for weight in backbone.weights:
        weight.trainable = False
    for layer, block, _ in found:
        adapt(layer, memory, block=block, lora_alpha=lora_alpha, rslora=rslora)
    object.__setattr__(backbone, _MEMORY_ATTRIBUTE, memory)
    object.__setattr__(backbone, _CONFIG_ATTRIBUTE, config)
    backbone.__class__ = _enabled_class(type(backbone))
    for model in (backbone, task):
        _forget_compiled_functions(model)
    return memory


def _forget_compiled_functions(model):
    # A function traced before `enable` (TensorFlow keeps its graph) would
    # keep running the model without adapters.
    for name in ("train_function", "test_function", "predict_function", "generate_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


# Memory config entries that `enable` sets itself or that are `Layer` basics.
_NOT_MEMORY_KWARGS = ("num_atoms", "rank", "num_blocks", "name", "trainable", "dtype")
_CONFIG_ATTRIBUTE = "_keras_qlora_config"


def get_enable_config(backbone):
    """The arguments `enable` was called with on `backbone` (JSON-ready), or `None`."""
    config = getattr(backbone, _CONFIG_ATTRIBUTE, None)
    return None if config is None else dict(config)


@keras.saving.register_keras_serializable(package="keras_qlora", name="EnabledBackbone")
class EnabledBackbone:
    """What an enabled backbone's class derives from, for `.keras` files.

    `enable` makes the backbone an instance of a subclass of its own class
    (same name) with this mixin first. Its config is the base config plus a
    `"keras_qlora"` entry (the base class and the `enable` arguments);
    `from_config` rebuilds the base backbone, then calls `enable` on it, so
    that weight loading finds the adapters where they were saved.
    """

    def get_config(self):
        config = super().get_config()
        base = type(self)._keras_qlora_base
        config["keras_qlora"] = {
            "base_class": {
                "module": base.__module__,
                "class_name": base.__name__,
                "registered_name": keras.saving.get_registered_name(base),
            },
            "enable": get_enable_config(self),
        }
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        entry = config.pop("keras_qlora", None)
        if not isinstance(entry, dict) or not isinstance(entry.get("enable"), dict):
            raise ValueError(
                "A `keras_qlora>EnabledBackbone` config needs its `keras_qlora` "
                f"entry. Received: keras_qlora={entry!r}"
            )
        base_cls = _base_class(entry.get("base_class") or {})
        backbone = base_cls.from_config(config)
        enable(backbone, **entry["enable"])
        return backbone


def _base_class(spec):
    registered = spec.get("registered_name")
    cls = keras.saving.get_registered_object(registered) if registered else None
    if cls is None:
        module, name = spec.get("module") or "", spec.get("class_name")
        # Only Keras's own packages are imported by module path, as Keras does.
        if module.split(".")[0] in ("keras", "keras_hub"):
            cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ValueError(
            "Could not find the base class of an enabled backbone; register it "
            "with `keras.saving.register_keras_serializable`. Received: "
            f"base_class={spec!r}"
        )
    return cls


_ENABLED_CLASSES = {}


def _enabled_class(cls):
    if cls not in _ENABLED_CLASSES:
        enabled = type(
            cls.__name__,
            (EnabledBackbone, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_keras_qlora_base": cls,
            },
        )
        # Every enabled class saves under one registered name, which stays
        # bound to the mixin: its `from_config` rebuilds any of them.
        keras.saving.register_keras_serializable("keras_qlora", "EnabledBackbone")(enabled)
        keras.saving.get_custom_objects()["keras_qlora>EnabledBackbone"] = EnabledBackbone
        _ENABLED_CLASSES[cls] = enabled
    return _ENABLED_CLASSES[cls]


def find_memory(model):
    """The `AtomMemory` of a model: an enabled backbone, a task holding one
    (`model.backbone`), or any model with adapted layers."""
    memory = get_memory(model)
    if memory is None and get_memory(getattr(model, "backbone", None)) is not None:
        memory = get_memory(model.backbone)
    if memory is None and isinstance(model, keras.layers.Layer):
        memories = {
            id(l.memory): l.memory
            for l in model._flatten_layers(include_self=True)
            if isinstance(l, QueryableLoRAMixin)
        }
        if len(memories) > 1:
            raise ValueError(
                f"`model` holds {len(memories)} different `AtomMemory` objects; "
                f"pass the part that holds one. Received: model={model.name!r}"
            )
        memory = next(iter(memories.values()), None)
    if memory is None:
        raise ValueError(
            "`model` has no Queryable LoRA adapter: call `keras_qlora.enable` "
            f"on its backbone first. Received: model={getattr(model, 'name', model)!r}"
        )
    return memory


@contextlib.contextmanager
def disable_adapter(model):
    """Runs `model` as its base model inside the block (PEFT's `disable_adapter`).

    Sets the memory's adapter gate to 0, so every adapted layer returns its
    frozen base output exactly; compiled functions (`predict`, KerasHub's
    cached `generate`) read the gate, so they need no retracing. The gate is
    model-wide (all threads); the previous state returns on exit.

    Example:

    ```python
    with keras_qlora.disable_adapter(lm):
        base_answer = lm.generate(prompt)
    ```
    """
    memory = find_memory(model)
    previous = keras.ops.convert_to_numpy(memory.adapter_gate)
    memory.adapter_gate.assign(0.0)
    try:
        yield
    finally:
        memory.adapter_gate.assign(previous)
