"""Bases quantized by Keras (`int8`, `int4`) under a Queryable LoRA adapter.

Quantizing before or after adapting gives the same layer: at `B = 0` it
returns the quantized base's output exactly, the adapter stays float32 and
is what trains, and modes that would retrain or recalibrate the base
(`float8`, `gptq`) are refused by name.
"""

import numpy as np
import pytest
import keras

import keras_qlora
from backbones import FAMILIES, V
from reference import to_numpy

MODES = ["int8", "int4"]
pytestmark = pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")


def _memory(**kwargs):
    return keras_qlora.AtomMemory(**{"num_atoms": 4, "rank": 2, "num_blocks": 2, **kwargs})


def _dense():
    layer = keras.layers.Dense(5, activation="relu")
    layer.build((None, 6))
    return layer, np.random.default_rng(0).normal(size=(3, 6)).astype("float32")


def _einsum():
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(3, 2, 4), bias_axes="de")
    layer.build((2, 3, 6))
    return layer, np.random.default_rng(0).normal(size=(2, 3, 6)).astype("float32")


def _copy(layer):
    twin = type(layer).from_config(layer.get_config())
    twin.build(layer._build_shapes_dict["input_shape"])
    twin.set_weights(layer.get_weights())
    return twin


@pytest.mark.parametrize("order", ["quantize then adapt", "adapt then quantize"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [_dense, _einsum], ids=["Dense", "EinsumDense"])
def test_a_quantized_base_is_exact_at_init_and_the_adapter_acts(make, mode, order):
    layer, x = make()
    reference = _copy(layer)
    reference.quantize(mode)
    expected = to_numpy(reference(x))
    if order == "quantize then adapt":
        layer.quantize(mode)
        keras_qlora.adapt(layer, _memory())
    else:
        keras_qlora.adapt(layer, _memory())
        layer.quantize(mode)

    assert layer.quantization_mode == mode and keras.backend.standardize_dtype(layer.kernel.dtype) == "int8"
    np.testing.assert_array_equal(to_numpy(layer(x)), expected)
    assert sorted(w.name for w in layer.trainable_weights if "memory" not in w.path) == ["qlora_a", "qlora_b"]
    assert layer.qlora_a.dtype == layer.qlora_b.dtype == "float32"
    # The adapter is applied on the quantized path too.
    layer.qlora_b.assign(np.full(layer.qlora_b.shape, 0.5, "float32"))
    assert np.abs(to_numpy(layer(x)) - expected).max() > 1e-2


def _mlp():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    return model


def _fit_and_check_only_adapters_train(model, memory):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    frozen = {w.path: to_numpy(w) for w in model.weights if "qlora" not in w.path and "memory" not in w.path}
    b_before = [to_numpy(l.qlora_b) for l in model.layers]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for w in model.weights:
        if w.path in frozen:
            np.testing.assert_array_equal(to_numpy(w), frozen[w.path], err_msg=w.path)
    assert all(np.abs(to_numpy(l.qlora_b) - b).max() > 0 for l, b in zip(model.layers, b_before))
    assert {w.name for w in model.trainable_weights} == {"qlora_a", "qlora_b"} | {
        w.name for w in memory.trainable_weights
    }


@pytest.mark.parametrize("order", ["quantize then adapt", "adapt then quantize"])
def test_model_quantize_and_fit_trains_only_the_adapters(order):
    model = _mlp()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.quantize("int8")
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    memory = _memory()
    if order == "quantize then adapt":
        model.quantize("int8")
    for block, layer in enumerate(model.layers):
        keras_qlora.adapt(layer, memory, block=block)
    if order == "adapt then quantize":
        model.quantize("int8")  # reaches the adapted layers: they are leaves
    assert [l.quantization_mode for l in model.layers] == ["int8", "int8"]
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(reference(x)))
    _fit_and_check_only_adapters_train(model, memory)


@pytest.mark.parametrize("mode", MODES)
def test_an_adapted_quantized_model_round_trips_through_a_keras_file(tmp_path, mode):
    model = _mlp()
    memory = _memory()
    for block, layer in enumerate(model.layers):
        keras_qlora.adapt(layer, memory, block=block)
        layer.qlora_b.assign(np.random.default_rng(block).normal(0, 0.3, layer.qlora_b.shape).astype("float32"))
    model.quantize(mode)
    x = np.random.default_rng(3).normal(size=(4, 6)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert [l.quantization_mode for l in loaded.layers] == [mode, mode]
    assert loaded.layers[0].memory is loaded.layers[1].memory
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_a_quantized_kerashub_backbone_takes_an_adapter_either_way():
    backbone_cls, _, kwargs = FAMILIES["llama"]
    ids = np.random.default_rng(0).integers(1, V, size=(2, 6)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")}
    first = backbone_cls(**kwargs)
    second = backbone_cls(**kwargs)
    second.set_weights(first.get_weights())

    first.quantize("int8")
    expected = to_numpy(first(x))
    keras_qlora.enable(first, rank=2, num_atoms=4)
    keras_qlora.enable(second, rank=2, num_atoms=4)
    second.quantize("int8")

    for backbone in (first, second):
        query = backbone.transformer_layers[0]._self_attention_layer._query_dense
        assert isinstance(query, keras_qlora.layers.QueryableLoRAMixin)
        assert query.quantization_mode == "int8" and keras.backend.standardize_dtype(query.kernel.dtype) == "int8"
        np.testing.assert_array_equal(to_numpy(backbone(x)), expected)
        trainable = {w.name for w in backbone.trainable_weights}
        assert trainable == {"qlora_a", "qlora_b"} | {w.name for w in keras_qlora.get_memory(backbone).trainable_weights}
    # The adapter acts on the quantized projections.
    for layer in second._flatten_layers():
        if isinstance(layer, keras_qlora.layers.QueryableLoRAMixin):
            layer.qlora_b.assign(np.full(layer.qlora_b.shape, 0.3, "float32"))
    assert np.abs(to_numpy(second(x)) - expected).max() > 1e-3


def _gptq_config():
    from keras.quantizers import GPTQConfig

    return GPTQConfig(dataset=["a b"], tokenizer=lambda text: np.zeros((1, 4), "int32"))


@pytest.mark.parametrize("mode", ["float8", "gptq"])
def test_unsupported_quantization_modes_are_refused_by_name(mode):
    config = _gptq_config() if mode == "gptq" else None
    layer, x = _dense()
    keras_qlora.adapt(layer, _memory())
    before = [(w.path, w.dtype, to_numpy(w)) for w in layer.weights]
    with pytest.raises(ValueError, match=f"mode='{mode}'"):
        layer.quantize(mode, config=config)
    assert [(w.path, w.dtype) for w in layer.weights] == [(p, d) for p, d, _ in before]
    assert layer.quantization_mode is None

    if mode == "float8":
        base, _ = _dense()
        base.quantize(mode)
        with pytest.raises(ValueError, match="mode='float8'"):
            keras_qlora.adapt(base, _memory())
        assert type(base) is keras.layers.Dense and not hasattr(base, "qlora_a")
