"""Adapter-only files: `save_adapter` and `load_adapter`.

A file holds what Queryable LoRA added to a model and nothing of the base:
every adapted layer's `A` and `B`, the shared memory and its prior, and the
configuration needed to put them back (the `enable` arguments and the
memory config), with the library, Keras and file-format versions. It is a
`safetensors` file, so loading runs no code (no pickle); tensors are keyed
by the adapted layer's variable path (`transformer_layer_3/self_attention/
query/qlora_a`), never by position, and each carries a SHA-256 digest in the
header so a damaged file is refused rather than half loaded.
"""

import hashlib
import json
import os
import tempfile

import keras
import numpy as np

from keras_qlora import version
from keras_qlora.layers import QueryableLoRAMixin
from keras_qlora.memory import AtomMemory
from keras_qlora.prior import is_state_variable
from keras_qlora.retrofit import enable, find_memory, get_enable_config, get_memory, plan

FORMAT = "keras_qlora.adapter"
FORMAT_VERSION = 1
# Memory settings that must agree between a file and a model it loads into.
_MEMORY_FIELDS = ("num_atoms", "rank", "top_k", "key_dim", "summary_dim", "num_blocks", "summary", "routing")


def _layer_key(layer):
    kernel = getattr(layer, "_kernel", None)
    path = kernel.path if kernel is not None else layer.qlora_a.path
    return path.rpartition("/")[0]


def _backbone_of(model):
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, keras.layers.Layer) else model


def _adapted_layers(model):
    layers = [l for l in model._flatten_layers(include_self=True) if isinstance(l, QueryableLoRAMixin)]
    keyed = {}
    for layer in layers:
        key = _layer_key(layer)
        if key in keyed:
            raise ValueError(
                f"Two adapted layers share the variable path '{key}'; give the "
                "layers distinct names so the adapter file can tell them apart."
            )
        keyed[key] = layer
    return keyed


def _own_weights(layer, prefix):
    own = layer._trainable_variables + layer._non_trainable_variables
    return {f"{prefix}/{v.name}": v for v in own if not is_state_variable(v)}


def _tensors(model, memory):
    tensors = {}
    for key, layer in _adapted_layers(model).items():
        tensors[f"{key}/qlora_a"] = layer.qlora_a
        tensors[f"{key}/qlora_b"] = layer.qlora_b
    tensors.update(_weights_of_memory(memory))
    return tensors


def _weights_of_memory(memory):
    weights = _own_weights(memory, "memory")
    if memory.prior is not None:
        weights.update(_own_weights(memory.prior, "prior"))
    return weights


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def save_adapter(model, path):
    """Writes the Queryable LoRA adapter of `model` (and nothing of its base) to `path`.

    Args:
        model: a task or backbone after `keras_qlora.enable`, or any model
            built with Queryable LoRA layers.
        path: str or path-like, ending in `.safetensors`.

    The file is written to a temporary name first, then renamed, so an
    interrupted save never leaves a truncated file at `path`.
    """
    path = _check_path(path)
    backbone = _backbone_of(model)
    memory = find_memory(model)
    layers = _adapted_layers(backbone)
    arrays = {k: np.asarray(keras.ops.convert_to_numpy(v), dtype="float32") for k, v in _tensors(backbone, memory).items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "keras_qlora_version": version.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "backbone_class": type(backbone).__name__,
        "enable": json.dumps(get_enable_config(backbone) if get_memory(backbone) is memory else None),
        "memory": json.dumps(memory.get_config()),
        "layers": json.dumps(
            {k: {"block": l.block, "lora_alpha": l.lora_alpha, "rslora": l.rslora} for k, l in layers.items()}
        ),
        "sha256": json.dumps({k: _digest(a) for k, a in arrays.items()}),
    }
    from safetensors.numpy import save_file

    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file(arrays, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".safetensors"):
        raise ValueError(f"`path` must be a file name ending in '.safetensors'. Received: path={path!r}")
    return os.fspath(path)


def read_adapter(path):
    """Reads and checks an adapter file without touching any model.

    Returns:
        `(metadata, arrays)`: the decoded header entries (`enable`, `memory`,
        `layers` parsed from JSON) and a dict of float32 NumPy arrays.
    """
    path = _check_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter file at `path`. Received: path={path!r}")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"`path` is not a readable safetensors file (truncated or damaged?): "
            f"{error}. Received: path={path!r}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"`path` is a safetensors file but not a keras_qlora adapter "
            f"(format={metadata.get('format')!r}). Received: path={path!r}"
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"The adapter file has format version {metadata.get('format_version')!r}, "
            f"written by keras_qlora {metadata.get('keras_qlora_version')!r}; this is "
            f"keras_qlora {version.__version__}, which reads version {FORMAT_VERSION}. "
            f"Received: path={path!r}"
        )
    try:
        for name in ("enable", "memory", "layers", "sha256"):
            metadata[name] = json.loads(metadata[name])
    except (KeyError, ValueError) as error:
        raise ValueError(f"The adapter file's header is damaged ({error!r}). Received: path={path!r}") from None
    damaged = sorted(
        key for key, array in arrays.items() if metadata["sha256"].get(key) != _digest(array)
    )
    missing = sorted(set(metadata["sha256"]) - set(arrays))
    if damaged or missing:
        raise ValueError(
            f"The adapter file is damaged: tensors {damaged + missing} do not match "
            f"their recorded checksums. Received: path={path!r}"
        )
    return metadata, arrays


def _expected_shapes(backbone, metadata):
    """Tensor shapes the file must have to fit `backbone`, found without changing it."""
    config = metadata["enable"]
    if config is None:
        raise ValueError(
            "The adapter file comes from a model built from Queryable LoRA layers, "
            "not from `enable`; load it into the same model (with its adapters), "
            "where it only assigns weights."
        )
    found = plan(
        backbone, config["rank"], config["block_size"], config["target_layer_names"],
        config["exclude"], config["layers_to_transform"],
    )
    memory_kwargs = {k: v for k, v in metadata["memory"].items() if k != "name"}
    probe = AtomMemory(**memory_kwargs)
    shapes = {k: tuple(v.shape) for k, v in _weights_of_memory(probe).items()}
    blocks = {}
    for layer, block, factorization in found:
        key = _layer_key(layer)
        shapes[f"{key}/qlora_a"] = tuple(factorization.a_shape)
        shapes[f"{key}/qlora_b"] = tuple(factorization.b_shape)
        blocks[key] = block
    return shapes, blocks


def _compare(expected, arrays, where):
    lacking = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    problems = []
    if extra:
        problems.append(f"the file has tensors {where} lacks: {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    if lacking:
        problems.append(f"{where} has adapter weights the file lacks: {lacking[:6]}{' ...' if len(lacking) > 6 else ''}")
    shapes = [
        f"{k}: file {tuple(arrays[k].shape)}, model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(arrays))
        if tuple(arrays[k].shape) != tuple(expected[k])
    ]
    if shapes:
        problems.append(f"shapes differ: {shapes[:6]}{' ...' if len(shapes) > 6 else ''}")
    return problems


def load_adapter(model, path):
    """Loads an adapter file written by `save_adapter` into `model`.

    On a base model (no adapter yet), the file's `enable` arguments are
    applied to its backbone first, so a freshly built base backbone gets the
    adapter and reproduces the saved model's outputs exactly. On a model
    that already has adapters, the configurations must agree and the
    weights are replaced. Everything is checked before anything changes: a
    file that does not fit (other rank, layers, shapes or settings) raises a
    `ValueError` naming the differences and leaves `model` as it was.

    Args:
        model: a task or backbone (the same kind `save_adapter` was given).
        path: the `.safetensors` adapter file.

    Returns:
        The model's `AtomMemory`.
    """
    metadata, arrays = read_adapter(path)
    backbone = _backbone_of(model)
    memory = None
    try:
        memory = find_memory(model)
    except ValueError:
        pass
    if memory is None:
        try:
            expected, blocks = _expected_shapes(backbone, metadata)
        except ValueError as error:
            raise ValueError(f"The adapter file does not fit `model`: {error} Received: path={path!r}") from None
        problems = _compare(expected, arrays, "the backbone")
        saved_blocks = {k: v["block"] for k, v in metadata["layers"].items()}
        if not problems and saved_blocks != blocks:
            problems.append(f"block assignment differs: file {saved_blocks}, backbone {blocks}")
        if problems:
            raise ValueError(
                f"The adapter file does not fit `model`: {'; '.join(problems)}. "
                f"The model is unchanged. Received: path={path!r}"
            )
        memory = enable(backbone, **metadata["enable"])
    else:
        saved = metadata["memory"]
        differ = [
            f"{name}: file {saved.get(name)!r}, model {getattr(memory, name)!r}"
            for name in _MEMORY_FIELDS
            if saved.get(name) != getattr(memory, name)
        ]
        saved_prior = (saved.get("prior") or {}).get("config", {}).get("embedding_dim")
        model_prior = None if memory.prior is None else memory.prior.embedding_dim
        if saved_prior != model_prior:
            differ.append(f"prior embedding_dim: file {saved_prior!r}, model {model_prior!r}")
        expected = {k: tuple(v.shape) for k, v in _tensors(backbone, memory).items()}
        differ += _compare(expected, arrays, "the model")
        if differ:
            raise ValueError(
                f"The adapter file does not fit `model`: {'; '.join(differ)}. "
                f"The model is unchanged. Received: path={path!r}"
            )
    for key, variable in _tensors(backbone, memory).items():
        variable.assign(arrays[key])
    return memory
