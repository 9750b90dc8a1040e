"""Adapted layers: METHOD.md section 4 properties 1, 2, 5, 6 and 8, against NumPy."""

import numpy as np
import pytest
import keras

import keras_qlora
from keras_qlora.prior import is_state_variable
from conftest import adapted_layers, mlp, randomize_adapters
from reference import apply_routed, dense_forward, to_numpy


@pytest.mark.parametrize("summary", ["attention", "ema", "none"])
@pytest.mark.parametrize("routing_mode", ["block", "layer"])
def test_forward_matches_numpy_reference(summary, routing_mode):
    memory = keras_qlora.AtomMemory(
        num_atoms=6, rank=4, top_k=2, num_blocks=2, summary=summary, routing=routing_mode
    )
    model = mlp(memory, widths=(24, 16, 3), blocks=[0, 0, 1])
    randomize_adapters(model)
    x = np.random.default_rng(0).normal(size=(7, 12)).astype("float32")
    expected, _ = dense_forward(adapted_layers(model), memory, x)
    np.testing.assert_allclose(to_numpy(model(x)), expected, rtol=2e-4, atol=2e-5)


def test_zero_b_gives_the_frozen_base_output_exactly():
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=3, num_blocks=1)
    base = keras.layers.Dense(8, activation="tanh")
    x = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    expected = to_numpy(base(x))
    keras_qlora.adapt(base, memory)
    assert not np.any(to_numpy(base.qlora_b))
    np.testing.assert_array_equal(to_numpy(base(x)), expected)


def test_one_identity_atom_is_exactly_keras_lora():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 6)).astype("float32")
    keras_lora = keras.layers.Dense(8)
    keras_lora.build((None, 6))
    keras_lora.enable_lora(3, lora_alpha=6.0)
    keras_lora.lora_kernel_b.assign(rng.normal(size=(3, 8)).astype("float32"))

    memory = keras_qlora.AtomMemory(num_atoms=1, rank=3, top_k=1)
    memory.atoms.assign(np.eye(3, dtype="float32")[None])
    ours = keras.layers.Dense(8)
    ours.build((None, 6))
    ours.kernel.assign(keras_lora._kernel)
    ours.bias.assign(keras_lora.bias)
    keras_qlora.adapt(ours, memory, lora_alpha=6.0)
    ours.qlora_a.assign(keras_lora.lora_kernel_a)
    ours.qlora_b.assign(keras_lora.lora_kernel_b)
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(keras_lora(x)), rtol=1e-5, atol=1e-5)


def test_one_atom_is_a_static_mixer():
    rng = np.random.default_rng(3)
    memory = keras_qlora.AtomMemory(num_atoms=1, rank=3, top_k=1)
    layer = keras_qlora.QueryableLoRADense(5, memory=memory, lora_alpha=1.5, use_bias=False)
    x = rng.normal(size=(4, 6)).astype("float32")
    layer(x)
    u = rng.normal(size=(1, 3, 3)).astype("float32")
    memory.atoms.assign(u)
    layer.qlora_b.assign(rng.normal(size=(3, 5)).astype("float32"))
    a, b, w = to_numpy(layer.qlora_a), to_numpy(layer.qlora_b), to_numpy(layer.kernel)
    expected = x @ w + 1.5 / 3 * (x @ a @ u[0]) @ b
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_inverse_square_root_of_rank():
    memory = keras_qlora.AtomMemory(num_atoms=2, rank=4)
    plain = keras_qlora.QueryableLoRADense(3, memory=memory, lora_alpha=8)
    rs = keras_qlora.QueryableLoRADense(3, memory=memory, lora_alpha=8, rslora=True)
    assert plain.lora_scale == 2.0 and rs.lora_scale == 4.0


def test_update_is_bounded_by_operator_norms():
    rng = np.random.default_rng(4)
    memory = keras_qlora.AtomMemory(num_atoms=5, rank=3, top_k=2)
    layer = keras_qlora.QueryableLoRADense(7, memory=memory, use_bias=False, lora_alpha=2.0)
    x = np.concatenate([rng.normal(size=(50, 9)), 1e3 * rng.normal(size=(10, 9))]).astype("float32")
    layer(x)
    memory.atoms.assign(rng.normal(size=(5, 3, 3)).astype("float32"))
    layer.qlora_b.assign(rng.normal(size=(3, 7)).astype("float32"))
    delta = to_numpy(layer(x)) - x.astype(np.float64) @ to_numpy(layer.kernel)
    norm = lambda m: np.linalg.norm(m, 2)
    bound = (
        layer.lora_scale
        * norm(to_numpy(layer.qlora_a))
        * norm(to_numpy(layer.qlora_b))
        * max(norm(u) for u in to_numpy(memory.atoms))
        * np.linalg.norm(x, axis=-1)
    )
    assert (np.linalg.norm(delta, axis=-1) <= bound * (1 + 1e-4)).all()


def test_per_position_update_is_the_rank_r_map_a_r_b():
    rng = np.random.default_rng(5)
    memory = keras_qlora.AtomMemory(num_atoms=6, rank=2, top_k=3)
    layer = keras_qlora.QueryableLoRADense(10, memory=memory, use_bias=False)
    x = rng.normal(size=(4, 3, 8)).astype("float32")
    layer(x)
    layer.qlora_b.assign(rng.normal(size=(2, 10)).astype("float32"))
    with memory.capture_routing() as records:
        y = to_numpy(layer(x))
    alpha = to_numpy(records[0]["alpha"])
    a, b, atoms = to_numpy(layer.qlora_a), to_numpy(layer.qlora_b), to_numpy(memory.atoms)
    for i, j in [(0, 0), (2, 1), (3, 2)]:
        mixed = np.einsum("m,mij->ij", alpha[i, j], atoms)
        update = layer.lora_scale * a @ mixed @ b
        assert np.linalg.matrix_rank(update, tol=1e-6) <= 2
        base = x[i, j].astype(np.float64) @ to_numpy(layer.kernel)
        np.testing.assert_allclose(y[i, j], base + x[i, j] @ update, rtol=1e-4, atol=1e-5)


EINSUM_CASES = [
    # equation, output_shape, input shape, A shape, B shape
    ("abc,cde->abde", (5, 2, 3), (2, 5, 4), (4, 3), (3, 2, 3)),
    ("abcd,cde->abe", (5, 6), (2, 5, 2, 3), (2, 3, 3), (3, 6)),
    ("...b,bc->...c", (6,), (2, 5, 4), (4, 3), (3, 6)),
    ("ab,bcd->acd", (2, 4), (3, 5), (5, 3), (3, 2, 4)),
]


@pytest.mark.parametrize("equation,output_shape,input_shape,a_shape,b_shape", EINSUM_CASES)
def test_einsum_dense_factorization_matches_flattened_numpy(equation, output_shape, input_shape, a_shape, b_shape):
    rng = np.random.default_rng(6)
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=3, top_k=2)
    layer = keras_qlora.QueryableLoRAEinsumDense(equation, output_shape, memory=memory)
    x = rng.normal(size=input_shape).astype("float32")
    layer(x)
    assert tuple(layer.qlora_a.shape) == a_shape and tuple(layer.qlora_b.shape) == b_shape
    layer.qlora_b.assign(rng.normal(size=b_shape).astype("float32"))
    with memory.capture_routing() as records:
        y = to_numpy(layer(x))
    base = np.einsum(equation, x.astype(np.float64), to_numpy(layer.kernel))
    # Flatten: A as (d_in, r), B as (r, d_out); positions are the input's
    # non-contracted axes.
    n_in = len(a_shape) - 1
    x_pos = x.reshape(x.shape[: x.ndim - n_in] + (-1,)).astype(np.float64)
    z = x_pos @ to_numpy(layer.qlora_a).reshape(-1, 3)
    routed = apply_routed(to_numpy(records[0]["alpha"]), z, to_numpy(memory.atoms))
    delta = routed @ to_numpy(layer.qlora_b).reshape(3, -1)
    np.testing.assert_allclose(y.reshape(delta.shape), (base.reshape(delta.shape) + delta), rtol=1e-4, atol=1e-4)


def test_adapt_in_place_keeps_base_weight_objects_and_paths():
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2)
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 4), bias_axes="de", name="query")
    layer.build((None, 5, 6))
    kernel, bias = layer.kernel, layer.bias
    paths = [w.path for w in layer.weights]
    assert keras_qlora.adapt(layer, memory) is layer
    assert isinstance(layer, keras_qlora.QueryableLoRAEinsumDense) and type(layer).__name__ == "EinsumDense"
    assert layer.kernel is kernel and layer.bias is bias
    assert [w.path for w in layer.weights][:2] == paths
    assert [w.name for w in layer.trainable_weights if w.path.startswith("query/")] == ["qlora_a", "qlora_b"]
    assert not kernel.trainable and not bias.trainable


def test_adapt_keeps_a_subclass_behaviour():
    class Scaled(keras.layers.Dense):
        def call(self, inputs, training=None):
            return 2.0 * super().call(inputs)

    layer = Scaled(3, use_bias=False)
    x = np.ones((2, 4), "float32")
    expected = to_numpy(layer(x))
    keras_qlora.adapt(layer, keras_qlora.AtomMemory(num_atoms=2, rank=2))
    assert isinstance(layer, Scaled) and isinstance(layer, keras_qlora.layers.QueryableLoRAMixin)
    np.testing.assert_array_equal(to_numpy(layer(x)), expected)


def test_fit_trains_only_the_adapter_and_memory():
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=3)
    model = mlp(memory)
    before = {w.path: to_numpy(w) for w in model.weights}
    frozen = [w.path for w in model.non_trainable_weights if not is_state_variable(w)]
    assert sorted(frozen) == sorted(
        w.path for l in adapted_layers(model) for w in (l.kernel, l.bias)
    )
    x = np.random.default_rng(7).normal(size=(64, 12)).astype("float32")
    y = np.random.default_rng(8).normal(size=(64, 3)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for path in frozen:
        np.testing.assert_array_equal(to_numpy(next(w for w in model.weights if w.path == path)), before[path])
    changed = {w.path for w in model.trainable_weights if not np.array_equal(to_numpy(w), before[w.path])}
    assert {l.qlora_b.path for l in adapted_layers(model)} <= changed
    assert memory.atoms.path in changed


def test_jit_and_eager_agree_and_repeat_exactly():
    memory = keras_qlora.AtomMemory(num_atoms=5, rank=3, num_blocks=3)
    model = mlp(memory)
    randomize_adapters(model)
    x = np.random.default_rng(9).normal(size=(16, 12)).astype("float32")
    eager = to_numpy(model(x))
    np.testing.assert_array_equal(to_numpy(model(x)), eager)
    # XLA on TensorFlow and JAX; torch.compile is tested on its own below.
    model.compile(jit_compile=keras.backend.backend() != "torch")
    np.testing.assert_allclose(model.predict(x, batch_size=16, verbose=0), eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, batch_size=16, verbose=0), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile is the torch backend's jit")
def test_torch_compile_agrees_with_eager():
    import torch

    memory = keras_qlora.AtomMemory(num_atoms=5, rank=3, num_blocks=3)
    model = mlp(memory)
    randomize_adapters(model)
    x = np.random.default_rng(9).normal(size=(16, 12)).astype("float32")
    eager = to_numpy(model(x))
    compiled = torch.compile(lambda t: model(t))
    for _ in range(2):
        np.testing.assert_allclose(to_numpy(compiled(torch.tensor(x))), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["float32", "bfloat16", "mixed_bfloat16"])
def test_dtype_policies_give_finite_outputs_with_float32_routing(policy):
    keras.config.set_dtype_policy(policy)
    memory = keras_qlora.AtomMemory(num_atoms=5, rank=3, num_blocks=3)
    model = mlp(memory)
    randomize_adapters(model)
    x = np.random.default_rng(10).normal(size=(4, 12)).astype("float32")
    with memory.capture_routing() as records:
        y = model(x)
    assert keras.backend.standardize_dtype(y.dtype) == keras.DTypePolicy(policy).compute_dtype
    assert np.isfinite(to_numpy(y)).all()
    assert {keras.backend.standardize_dtype(r["alpha"].dtype) for r in records} == {"float32"}
    for layer in adapted_layers(model):
        assert layer.qlora_a.dtype == "float32" and layer.qlora_b.dtype == "float32"
    assert {w.dtype for w in memory.weights} == {"float32"}


def test_two_threads_give_the_same_results_as_sequential_calls():
    import threading

    memory = keras_qlora.AtomMemory(num_atoms=5, rank=3, num_blocks=3, top_k=5)
    model = mlp(memory)
    randomize_adapters(model)
    rng = np.random.default_rng(11)
    inputs = [rng.normal(size=(8, 12)).astype("float32") for _ in range(2)]
    expected = [to_numpy(model(x)) for x in inputs]
    results = [[], []]
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(15):
            results[i].append(to_numpy(model(inputs[i])))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(results[i]) == 15
        for got in results[i]:
            np.testing.assert_allclose(got, expected[i], rtol=1e-6, atol=1e-6)
