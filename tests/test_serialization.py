"""Configs, `.keras` files (the shared memory stored once) and cross-backend loading."""

import json
import os
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import keras

import keras_qlora
from conftest import adapted_layers, randomize_adapters
from reference import to_numpy

HERE = os.path.dirname(os.path.abspath(__file__))


def _instructed_model():
    prior = keras_qlora.InstructionPrior(embedding_dim=4, prior_strength=0.5, instruction_in_query=True)
    memory = keras_qlora.AtomMemory(num_atoms=6, rank=3, num_blocks=2, summary="ema", prior=prior)
    tokens, e = keras.Input((5, 8)), keras.Input((4,))
    h = keras_qlora.QueryableLoRAEinsumDense(
        "abc,cde->abde", (5, 2, 4), memory=memory, block=0, bias_axes="de", name="query"
    )(tokens, instruction=e)
    h = keras.layers.Reshape((5, 8))(h)
    out = keras_qlora.QueryableLoRADense(3, memory=memory, block=1, rslora=True, lora_alpha=2.0)(h, instruction=e)
    return keras.Model([tokens, e], out)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, 5, 8)).astype("float32"), rng.normal(size=(2, 4)).astype("float32")]


def test_memory_config_round_trip():
    prior = keras_qlora.InstructionPrior(embedding_dim=4, prior_strength=0.3, prior_kl_weight=0.1)
    memory = keras_qlora.AtomMemory(
        num_atoms=5, rank=2, top_k=3, key_dim=8, summary_dim=6, num_blocks=4, summary="ema",
        routing="layer", temperature=0.5, summary_momentum=0.8, atom_initializer="orthogonal", prior=prior,
    )
    config = memory.get_config()
    json.dumps(config)
    clone = keras_qlora.AtomMemory.from_config(config)
    assert clone.get_config() == config
    assert clone.prior.prior_kl_weight == 0.1 and isinstance(clone.atom_initializer, keras_qlora.OrthogonalAtoms)


def test_layer_from_config_keeps_sharing_the_given_memory():
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=2)
    layer = keras_qlora.QueryableLoRADense(3, memory=memory, block=1, lora_alpha=4.0, activation="relu")
    clone = keras_qlora.QueryableLoRADense.from_config(layer.get_config())
    assert clone.memory is memory
    assert (clone.block, clone.lora_alpha, clone.rslora, clone.units) == (1, 4.0, False, 3)


def test_keras_file_round_trip_stores_the_memory_once(tmp_path):
    model = _instructed_model()
    randomize_adapters(model)
    inputs = _inputs()
    expected = to_numpy(model(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        archive.extract("model.weights.h5", tmp_path)
    shapes = []
    with h5py.File(tmp_path / "model.weights.h5") as f:
        f.visititems(lambda name, obj: shapes.append(obj.shape) if isinstance(obj, h5py.Dataset) else None)
    assert shapes.count((6, 3, 3)) == 1  # the atoms

    loaded = keras.saving.load_model(path)
    layers = adapted_layers(loaded)
    assert layers[0].memory is layers[1].memory
    assert layers[0].memory.prior.instruction_in_query
    np.testing.assert_array_equal(to_numpy(loaded(inputs)), expected)


def test_adapted_in_place_model_round_trips(tmp_path):
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs))
    model = keras.Model(inputs, outputs)
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=2)
    for block, layer in enumerate(model.layers[1:]):
        keras_qlora.adapt(layer, memory, block=block)
    randomize_adapters(model)
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    model.save(tmp_path / "adapted.keras")
    loaded = keras.saving.load_model(tmp_path / "adapted.keras")
    assert all(isinstance(l, keras_qlora.QueryableLoRADense) for l in loaded.layers[1:])
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_a_base_checkpoint_still_loads_after_adapting(tmp_path):
    def base():
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(3, name="proj")(inputs))

    trained = base()
    trained.save_weights(tmp_path / "base.weights.h5")
    model = base()
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2)
    keras_qlora.adapt(model.get_layer("proj"), memory)
    b = np.random.default_rng(2).normal(size=(2, 3)).astype("float32")
    model.get_layer("proj").qlora_b.assign(b)
    model.load_weights(tmp_path / "base.weights.h5")
    np.testing.assert_array_equal(to_numpy(model.get_layer("proj").kernel), to_numpy(trained.layers[1].kernel))
    np.testing.assert_array_equal(to_numpy(model.get_layer("proj").qlora_b), b)


_SAVE_SCRIPT = """
import sys, numpy as np, keras
sys.path.insert(0, {here!r})
import test_serialization as t
from conftest import randomize_adapters
keras.utils.set_random_seed(0)
model = t._instructed_model()
randomize_adapters(model)
model.save({path!r})
np.save({out!r}, keras.ops.convert_to_numpy(model(t._inputs())))
"""


@pytest.mark.parametrize("offset", [1, 2])
def test_a_file_saved_under_another_backend_loads_with_the_same_outputs(tmp_path, offset):
    backends = ["tensorflow", "torch", "jax"]
    other = backends[(backends.index(keras.backend.backend()) + offset) % 3]
    path, out = str(tmp_path / "model.keras"), str(tmp_path / "out.npy")
    env = dict(os.environ, KERAS_BACKEND=other, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    subprocess.run(
        [sys.executable, "-c", _SAVE_SCRIPT.format(here=HERE, path=path, out=out)],
        env=env, check=True, capture_output=True, timeout=300,
    )
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(_inputs())), np.load(out), rtol=1e-5, atol=1e-5)
