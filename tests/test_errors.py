"""Bad input raises an error that names the argument and the value received,
and leaves the user's layer as it was."""

import numpy as np
import pytest
import keras

import keras_qlora
from reference import to_numpy


def _memory(**kwargs):
    return keras_qlora.AtomMemory(**{"num_atoms": 4, "rank": 2, "num_blocks": 2, **kwargs})


CONSTRUCTOR_CASES = [
    (lambda: _memory(rank=0), "rank=0"),
    (lambda: _memory(rank=-3), "rank=-3"),
    (lambda: _memory(rank=2.5), "rank=2.5"),
    (lambda: _memory(num_atoms=0), "num_atoms=0"),
    (lambda: _memory(top_k=5), "top_k=5"),
    (lambda: _memory(top_k=0), "top_k=0"),
    (lambda: _memory(num_blocks=0), "num_blocks=0"),
    (lambda: _memory(summary="mean"), "summary='mean'"),
    (lambda: _memory(routing="token"), "routing='token'"),
    (lambda: _memory(temperature=0), "temperature=0"),
    (lambda: _memory(summary_momentum=1.0), "summary_momentum=1.0"),
    (lambda: _memory(atom_initializer="eye"), "atom_initializer='eye'"),
    (lambda: _memory(prior="bert"), "prior='bert'"),
    (lambda: keras_qlora.InstructionPrior(embedding_dim=0), "embedding_dim=0"),
    (lambda: keras_qlora.InstructionPrior(embedding_dim=4, prior_strength=-1), "prior_strength=-1"),
    (lambda: keras_qlora.InstructionPrior(embedding_dim=4, prior_temperature=0), "prior_temperature=0"),
    (lambda: keras_qlora.QueryableLoRADense(3, memory=_memory(), block=2), "block=2"),
    (lambda: keras_qlora.QueryableLoRADense(3, memory=_memory(), block=-1), "block=-1"),
    (lambda: keras_qlora.QueryableLoRADense(3, memory=_memory(), rank=0), "rank=0"),
    (lambda: keras_qlora.QueryableLoRADense(3, memory=_memory(), rank=4), "rank=4"),
    (lambda: keras_qlora.QueryableLoRADense(3, memory="shared"), "memory='shared'"),
    (lambda: keras_qlora.QueryableLoRADense(3, memory=_memory(), lora_alpha=0), "lora_alpha=0"),
    (lambda: keras_qlora.factorize_equation("abc,acd->abd", (2, 3, 4), 2), "equation='abc,acd->abd'"),
    (lambda: keras_qlora.factorize_equation("ab,bcz->ac", (2, 3, 4), 2), "equation='ab,bcz->ac'"),
    (lambda: keras_qlora.factorize_equation("ab...,bc->ac...", (2, 3), 2), "equation='ab...,bc->ac...'"),
]


@pytest.mark.parametrize("make,received", CONSTRUCTOR_CASES, ids=[c[1] for c in CONSTRUCTOR_CASES])
def test_bad_constructor_argument_names_the_value(make, received):
    with pytest.raises(ValueError, match="Received") as error:
        make()
    assert received in str(error.value)


def test_unfactorizable_einsum_layer_fails_at_build():
    layer = keras_qlora.QueryableLoRAEinsumDense("abc,acd->abd", (3, 4), memory=_memory())
    with pytest.raises(ValueError, match="abc,acd->abd"):
        layer.build((2, 3, 5))


def test_instruction_of_the_wrong_width():
    prior = keras_qlora.InstructionPrior(embedding_dim=4)
    memory = _memory(prior=prior)
    layer = keras_qlora.QueryableLoRADense(3, memory=memory)
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        layer(np.ones((2, 5), "float32"), instruction=np.ones((2, 7), "float32"))
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        with memory.use_instruction(np.ones((2, 7), "float32")):
            pass


def test_instruction_without_a_prior():
    layer = keras_qlora.QueryableLoRADense(3, memory=_memory())
    with pytest.raises(ValueError, match="no `InstructionPrior`"):
        layer(np.ones((2, 5), "float32"), instruction=np.ones((2, 4), "float32"))


def _snapshot(layer):
    return type(layer), [w.path for w in layer.weights], [to_numpy(w) for w in layer.weights], [
        w.trainable for w in layer.weights
    ]


def _assert_unchanged(layer, snapshot):
    cls, paths, values, trainable = snapshot
    assert type(layer) is cls and [w.path for w in layer.weights] == paths
    assert [w.trainable for w in layer.weights] == trainable
    for got, expected in zip(layer.weights, values):
        np.testing.assert_array_equal(to_numpy(got), expected)


def test_adapting_an_unbuilt_layer():
    layer = keras.layers.Dense(3)
    with pytest.raises(ValueError, match="not built"):
        keras_qlora.adapt(layer, _memory())
    assert type(layer) is keras.layers.Dense and not layer.weights


def test_adapting_twice_leaves_the_layer_as_it_was():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    keras_qlora.adapt(layer, _memory())
    snapshot = _snapshot(layer)
    with pytest.raises(ValueError, match="already adapted"):
        keras_qlora.adapt(layer, _memory())
    _assert_unchanged(layer, snapshot)


@pytest.mark.parametrize(
    "kwargs,received",
    [({"block": 5}, "block=5"), ({"rank": 3}, "rank=3"), ({"lora_alpha": -1}, "lora_alpha=-1"), ({"rslora": "yes"}, "rslora='yes'")],
)
def test_rejected_adapt_arguments_leave_the_layer_as_it_was(kwargs, received):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    snapshot = _snapshot(layer)
    with pytest.raises(ValueError, match=received):
        keras_qlora.adapt(layer, _memory(), **kwargs)
    _assert_unchanged(layer, snapshot)


def test_unfactorizable_einsum_layer_is_not_adapted():
    layer = keras.layers.EinsumDense("abc,acd->abd", output_shape=(3, 4))
    layer.build((2, 3, 5))
    snapshot = _snapshot(layer)
    with pytest.raises(ValueError, match="abc,acd->abd"):
        keras_qlora.adapt(layer, _memory())
    _assert_unchanged(layer, snapshot)


def test_adapting_a_layer_that_is_not_linear():
    layer = keras.layers.Conv1D(3, 2)
    layer.build((None, 5, 4))
    with pytest.raises(TypeError, match="Conv1D"):
        keras_qlora.adapt(layer, _memory())


def test_adapting_a_layer_with_keras_lora():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    layer.enable_lora(2)
    snapshot = _snapshot(layer)
    with pytest.raises(ValueError, match="Keras's own LoRA"):
        keras_qlora.adapt(layer, _memory())
    _assert_unchanged(layer, snapshot)
    adapted = keras_qlora.QueryableLoRADense(3, memory=_memory())
    with pytest.raises(ValueError, match="enable_lora"):
        adapted.enable_lora(2)
