"""Adapted linear layers: a frozen `Dense`/`EinsumDense` plus a routed adapter.

For every position of the input (METHOD.md section 1):

    z = x A                  low-rank state, (..., r)
    R z = sum_m alpha_m U_m z  routed by the shared `AtomMemory`
    y = f(x) + s (R z) B      s = lora_alpha / r, or lora_alpha / sqrt(r)

The full `d_in x d_out` update is never formed. A layer is either built fresh
(`QueryableLoRADense`, `QueryableLoRAEinsumDense`) or taken over in place from
an already-built Keras layer with `adapt(layer, memory)`: the adapter weights
are added to the existing layer and its class is swapped for the adapted one
(the technique of `torch.nn.utils.parametrize`), so the base weights keep
their objects and variable paths.

A base quantized by Keras (`"int8"`, `"int4"`; before or after adapting,
through `layer.quantize` or `model.quantize`) keeps its own quantized call
for `f(x)`: at `B = 0` the layer returns the quantized base output exactly,
while `A`, `B` and the memory stay float32 and train.
"""

import inspect
import math
import threading
import types
import warnings

import keras
from keras import ops
from keras.src.backend.common import global_state

from keras_qlora._validation import check_non_negative, check_positive_int
from keras_qlora.factorization import factorize_layer
from keras_qlora.memory import AtomMemory

ADAPTER_KEYS = ("qlora_a", "qlora_b")
# Keras's quantized calls whose frozen base output the adapter can add to.
# float8 trains its own scales and gptq/awq calibrate the kernel against the
# inputs, which an adapter trained beside the base would invalidate.
QUANTIZATION_MODES = ("int8", "int4")


def _check_quantization_mode(layer, mode):
    if mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"Layer '{layer.name}' carries a Queryable LoRA adapter; its base "
            f"can be quantized with the modes {list(QUANTIZATION_MODES)} only. "
            f"Received: mode={mode!r}"
        )


class _InBaseCall(threading.local):
    """Ids of the adapted layers running their base class's call in this thread."""

    def __init__(self):
        self.layers = set()


_IN_BASE_CALL = _InBaseCall()


def _check_adapter_args(memory, rank, block, lora_alpha, rslora):
    if not isinstance(memory, AtomMemory):
        raise ValueError(
            f"`memory` must be a `keras_qlora.AtomMemory`. Received: memory={memory!r}"
        )
    if rank is not None:
        check_positive_int("rank", rank)
        if rank != memory.rank:
            raise ValueError(
                f"`rank` must equal the memory's rank ({memory.rank}): the "
                f"atoms are {memory.rank}x{memory.rank}. Received: rank={rank}"
            )
    memory.check_block(block)
    if lora_alpha is not None:
        check_non_negative("lora_alpha", lora_alpha, strictly=True)
    if not isinstance(rslora, bool):
        raise ValueError(f"`rslora` must be a bool. Received: rslora={rslora!r}")


def _initializer(name, value):
    try:
        initializer = keras.initializers.get(value)
    except (ValueError, TypeError):
        initializer = None
    if not callable(initializer):
        # `get` instantiates any class it is given, `object` included.
        raise ValueError(
            f"`{name}` must be a Keras initializer, its name or its config. "
            f"Received: {name}={value!r}"
        )
    return initializer


class QueryableLoRAMixin:
    """The adapter shared by every adapted layer class."""

    def _configure_adapter(self, memory, block, lora_alpha, rslora, a_initializer, b_initializer):
        self.memory = memory
        self.rank = memory.rank
        self.block = block
        self.lora_alpha = float(self.rank if lora_alpha is None else lora_alpha)
        self.rslora = rslora
        self.a_initializer = _initializer("a_initializer", a_initializer)
        self.b_initializer = _initializer("b_initializer", b_initializer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapter(factorize_layer(self, self.rank))

    @property
    def lora_scale(self):
        """`s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `rslora`."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def _build_adapter(self, factorization):
        self.factorization = factorization
        self.qlora_a = self.add_weight(
            name="qlora_a",
            shape=factorization.a_shape,
            initializer=self.a_initializer,
            dtype="float32",
        )
        self.qlora_b = self.add_weight(
            name="qlora_b",
            shape=factorization.b_shape,
            initializer=self.b_initializer,
            dtype="float32",
        )
        for weight in (getattr(self, "_kernel", None), self.bias):
            if weight is not None:
                weight.trainable = False

    @property
    def activation(self):
        # Hidden from the base class's own call (float or quantized), which
        # then returns the pre-activation output; the update is added to
        # that, and the activation applied last. The value lives in the
        # instance dict, where `Dense.__init__` put it before `adapt`.
        if id(self) in _IN_BASE_CALL.layers:
            return None
        return self.__dict__.get("activation")

    @activation.setter
    def activation(self, value):
        self.__dict__["activation"] = value

    def call(self, inputs, instruction=None, training=None):
        return self._adapted_call(super().call, inputs, instruction, training)

    def quantized_call(self, inputs, instruction=None, training=None):
        # Keras calls this instead of `call` once the layer is quantized.
        _check_quantization_mode(self, self.quantization_mode)
        return self._adapted_call(super().quantized_call, inputs, instruction, training)

    def _adapted_call(self, base_call, inputs, instruction, training):
        # The base output comes from the base class's own call, so a zero
        # update is exact in every mode, quantized ones included.
        _IN_BASE_CALL.layers.add(id(self))
        try:
            outputs = base_call(inputs, training=training)
        finally:
            _IN_BASE_CALL.layers.discard(id(self))
        outputs = outputs + self.adapter_delta(inputs, instruction)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the frozen base kernel (`"int8"` or `"int4"`); `A`, `B`
        and the memory stay float32 and keep training."""
        _check_quantization_mode(self, mode)
        # Keras refuses subclasses (`type_check`) because they may compute
        # the output otherwise; this one calls the base class's own
        # quantized call.
        super().quantize(mode, type_check=False, config=config)

    def _flatten_layers(self, include_self=True, recursive=True):
        # The shared memory is tracked here so that a model built from the
        # layers finds its weights, but it is no part of this layer: leaving
        # it out makes the layer a leaf again, the only layers that
        # `Model.quantize` quantizes.
        shared = {id(l) for l in self.memory._flatten_layers()}
        return [l for l in super()._flatten_layers(include_self, recursive) if id(l) not in shared]

    def adapter_delta(self, inputs, instruction=None):
        """The routed update `s (R z) B`, in the layer's compute dtype."""
        # Float32 adapter weights meet the compute dtype here: autocasting
        # only happens under mixed policies, not under e.g. "bfloat16".
        # Under float16 the adapter runs in float32: `x A` of unnormalized
        # activations overflows float16's range easily, and TensorFlow 2.21
        # on CPU returns wrong values for a float16 einsum like "...i,ir->...r".
        dtype = "float32" if self.compute_dtype == "float16" else self.compute_dtype
        z = ops.einsum(
            self.factorization.down_equation, ops.cast(inputs, dtype), ops.cast(self.qlora_a, dtype)
        )
        routed, kl_loss = self.memory.routed_update(z, self.block, self, instruction)
        if kl_loss is not None:
            self.add_loss(kl_loss)
        # The scale is applied in the bottleneck (r values per position, not
        # d_out), before `B`.
        delta = ops.einsum(
            self.factorization.up_equation, ops.cast(routed * self.lora_scale, dtype), ops.cast(self.qlora_b, dtype)
        )
        return ops.cast(delta, self.compute_dtype)

    def enable_lora(self, *args, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' already carries a Queryable LoRA adapter; "
            "Keras's `enable_lora` cannot be combined with it."
        )

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["qlora_a"] = self.qlora_a
        store["qlora_b"] = self.qlora_b

    def load_own_variables(self, store):
        # A checkpoint of the base layer alone (no adapter keys) still loads.
        super().load_own_variables(store)
        if all(key in store for key in ADAPTER_KEYS):
            self.qlora_a.assign(store["qlora_a"])
            self.qlora_b.assign(store["qlora_b"])

    def _check_load_own_variables(self, store):
        adapter = {id(self.qlora_a), id(self.qlora_b)}
        base_vars = [
            v for v in self._trainable_variables + self._non_trainable_variables if id(v) not in adapter
        ]
        base_keys = [k for k in store.keys() if k not in ADAPTER_KEYS]
        if len(base_keys) != len(base_vars):
            raise ValueError(
                f"Layer '{self.name}' expected {len(base_vars)} base variables, "
                f"but received {len(base_keys)} during loading. "
                f"Expected: {[v.name for v in base_vars]}"
            )

    def get_config(self):
        # The memory object itself, not its config: Keras serializes it while
        # serializing this config, which is what lets `keras.saving` record
        # it as one object shared by every adapted layer.
        return {
            **super().get_config(),
            "memory": self.memory,
            "block": self.block,
            "lora_alpha": self.lora_alpha,
            "rslora": self.rslora,
            "a_initializer": keras.initializers.serialize(self.a_initializer),
            "b_initializer": keras.initializers.serialize(self.b_initializer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["memory"], dict):
            if global_state.get_global_attribute("shared_objects/id_to_obj_map") is None:
                warnings.warn(
                    f"Deserializing a `{cls.__name__}` outside "
                    "`keras.saving.load_model` gives it a private copy of its "
                    "`AtomMemory`; layers rebuilt this way no longer share one "
                    "memory. Pass `memory=` yourself to keep it shared.",
                    stacklevel=3,
                )
            config["memory"] = keras.saving.deserialize_keras_object(config["memory"])
        return super().from_config(config)


_ADAPTER_DEFAULTS = dict(rank=None, lora_alpha=None, rslora=False, a_initializer="he_uniform", b_initializer="zeros")


@keras.saving.register_keras_serializable(package="keras_qlora")
class QueryableLoRADense(QueryableLoRAMixin, keras.layers.Dense):
    """A frozen `Dense` layer with a Queryable LoRA adapter.

    Follows Queryable LoRA (arXiv 2605.08423) as this project defines it (the
    paper's equations were not published in reach; see `METHOD.md`):
    `y = activation(x W + b + s (x A R(x)) B)`, where `R(x)` is the
    routed mixture of the shared memory's atoms. The kernel and bias are
    frozen; only `A` (`qlora_a`) and `B` (`qlora_b`) train here, beside the
    shared memory. `B` starts at zero, so the layer starts as its base.

    To adapt a layer that already exists (and keep its weights), use
    `keras_qlora.adapt(layer, memory)`.

    Args:
        units: int. Output width, as in `keras.layers.Dense`.
        memory: `keras_qlora.AtomMemory`. The shared memory.
        block: int. Block index of this layer in `[0, memory.num_blocks)`.
            Defaults to `0`.
        rank: int or `None`. Must equal `memory.rank`; `None` takes it.
        lora_alpha: float or `None`. Scale numerator; `None` means `rank`
            (scale 1, as Keras's LoRA).
        rslora: bool. Scale by `lora_alpha / sqrt(rank)` instead of
            `lora_alpha / rank`. Defaults to `False`.
        a_initializer: initializer of `A`. Defaults to `"he_uniform"`.
        b_initializer: initializer of `B`. Defaults to `"zeros"`.
        **kwargs: the other arguments of `keras.layers.Dense`.

    Call arguments:
        inputs: the input tensor.
        instruction: optional `(batch, embedding_dim)` instruction embedding
            for the memory's `InstructionPrior`.

    Input shape:
        `(..., input_dim)`.

    Output shape:
        `(..., units)`.
    """

    def __init__(self, units, memory, block=0, **kwargs):
        adapter = {k: kwargs.pop(k, v) for k, v in _ADAPTER_DEFAULTS.items()}
        super().__init__(units, **kwargs)
        _check_adapter_args(memory, adapter.pop("rank"), block, adapter["lora_alpha"], adapter["rslora"])
        self._configure_adapter(memory, block, **adapter)


@keras.saving.register_keras_serializable(package="keras_qlora")
class QueryableLoRAEinsumDense(QueryableLoRAMixin, keras.layers.EinsumDense):
    """A frozen `EinsumDense` layer with a Queryable LoRA adapter.

    The kernel is treated as the matrix `(prod(input axes), prod(output
    axes))`: `A` has shape `input_axes + (rank,)` and `B` has shape
    `(rank,) + output_axes` (the PEFT convention). An equation with a kernel
    axis that is neither contracted nor only in the output raises a
    `ValueError` when the layer is built. See `QueryableLoRADense` for the
    method and the adapter arguments.

    Args:
        equation: str. As in `keras.layers.EinsumDense`.
        output_shape: As in `keras.layers.EinsumDense`.
        memory: `keras_qlora.AtomMemory`. The shared memory.
        block: int. Block index of this layer. Defaults to `0`.
        **kwargs: the adapter arguments of `QueryableLoRADense` and the other
            arguments of `keras.layers.EinsumDense`.
    """

    def __init__(self, equation, output_shape, memory, block=0, **kwargs):
        adapter = {k: kwargs.pop(k, v) for k, v in _ADAPTER_DEFAULTS.items()}
        super().__init__(equation, output_shape, **kwargs)
        _check_adapter_args(memory, adapter.pop("rank"), block, adapter["lora_alpha"], adapter["rslora"])
        self._configure_adapter(memory, block, **adapter)


def _in_place_class(cls):
    """The class an adapted `cls` instance takes; made once per class.

    It keeps `cls.__name__`: Keras names the weights of layers held in a list
    (a functional model's layers) by their class name, so keeping the name
    keeps every weight path, and a checkpoint of the base model still loads.
    For `Dense` and `EinsumDense` it derives from the fresh adapted class and
    is registered for `.keras` files under `keras_qlora>InPlace<name>`.
    """
    if cls not in _IN_PLACE_CLASSES:
        fresh = {keras.layers.Dense: QueryableLoRADense, keras.layers.EinsumDense: QueryableLoRAEinsumDense}
        bases = (fresh[cls],) if cls in fresh else (QueryableLoRAMixin, cls)
        adapted = type(
            cls.__name__,
            bases,
            {"__module__": __name__, "__qualname__": cls.__qualname__, "__doc__": bases[0].__doc__},
        )
        if cls in fresh:
            keras.saving.register_keras_serializable("keras_qlora", f"InPlace{cls.__name__}")(adapted)
        _IN_PLACE_CLASSES[cls] = adapted
    return _IN_PLACE_CLASSES[cls]


_IN_PLACE_CLASSES = {}
for _cls in (keras.layers.Dense, keras.layers.EinsumDense):
    _in_place_class(_cls)


def check_adaptable(layer):
    """Raises unless `adapt` can take `layer` over; changes nothing."""
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        raise TypeError(
            "`layer` must be a `keras.layers.Dense` or `keras.layers.EinsumDense`. "
            f"Received: layer={layer!r} of type {type(layer).__name__}"
        )
    if isinstance(layer, QueryableLoRAMixin):
        raise ValueError(
            f"Layer '{layer.name}' is already adapted; adapting it twice is "
            f"not supported. Received: layer={layer!r}"
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built; call it on an input (or "
            f"`layer.build(input_shape)`) before adapting it. Received: layer={layer!r}"
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has Keras's own LoRA enabled; it cannot also "
            f"carry a Queryable LoRA adapter. Received: layer={layer!r}"
        )
    if layer.quantization_mode is not None:
        _check_quantization_mode(layer, layer.quantization_mode)


def adapt(layer, memory, block=0, rank=None, lora_alpha=None, rslora=False,
          a_initializer="he_uniform", b_initializer="zeros"):
    """Adds a Queryable LoRA adapter to a built `Dense` or `EinsumDense`, in place.

    The layer keeps its kernel and bias objects (and their variable paths),
    which are frozen; `A` and `B` are added beside them and the layer's class
    becomes the adapted one (`QueryableLoRADense` for a `Dense`,
    `QueryableLoRAEinsumDense` for an `EinsumDense`). Nothing is changed if
    an argument is rejected.

    Args:
        layer: a built `keras.layers.Dense` or `keras.layers.EinsumDense`,
            float or quantized by Keras (`"int8"` or `"int4"`).
        memory: `keras_qlora.AtomMemory`. The shared memory.
        block: int. The layer's block index. Defaults to `0`.
        rank, lora_alpha, rslora, a_initializer, b_initializer: as in
            `QueryableLoRADense`.

    Returns:
        The same `layer` object.
    """
    check_adaptable(layer)
    _check_adapter_args(memory, rank, block, lora_alpha, rslora)
    factorization = factorize_layer(layer, memory.rank)
    a_initializer = _initializer("a_initializer", a_initializer)
    b_initializer = _initializer("b_initializer", b_initializer)

    layer._tracker.unlock()
    try:
        QueryableLoRAMixin._configure_adapter(
            layer, memory, block, lora_alpha, rslora, a_initializer, b_initializer
        )
        QueryableLoRAMixin._build_adapter(layer, factorization)
    finally:
        layer._tracker.lock()
    layer.__class__ = _in_place_class(type(layer))
    # Keras reads the call signature once, at construction.
    layer._call_signature = inspect.signature(layer.call)
    layer.call_signature_parameters = list(layer._call_signature.parameters)
    _rebind_quantize(layer)
    return layer


def _rebind_quantize(layer):
    """Points Keras's per-instance `quantize` wrapper at the adapted class.

    `Layer.__new__` wraps the `quantize` method the layer had when it was
    made (config resolution, argument checks, tracker unlock) and stores the
    wrapper on the instance, so after the class swap it would still call
    `Dense.quantize`, which refuses subclasses.
    """
    wrapper = layer.__dict__.get("quantize")
    names = getattr(getattr(wrapper, "__code__", None), "co_freevars", ())
    if "original_quantize_method" in names:
        cell = wrapper.__closure__[names.index("original_quantize_method")]
        cell.cell_contents = types.MethodType(type(layer).quantize, layer)
