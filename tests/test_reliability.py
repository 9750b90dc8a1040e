"""Reliability: damaged adapter files, properties over random configurations,
extreme numbers and dtype policies, seeds, interrupted training and threads.

Nothing the user trained is lost: a file that does not fit is refused before
anything changes, training resumes where it stopped, and the same seed gives
the same adapter.
"""

import os
import re
import threading

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import keras_qlora
from backbones import FAMILIES, V
from conftest import randomize_adapters
from reference import to_numpy

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_qlora")
# JAX compiles every eager op afresh for each new shape, and every example
# brings new shapes: fewer examples there keep the suite fast.
PROPERTIES = settings(
    max_examples=6 if keras.backend.backend() == "jax" else 15, deadline=None, derandomize=True, database=None
)


def _backbone(name="llama"):
    backbone_cls, _, kwargs = FAMILIES[name]
    return backbone_cls(**kwargs)


def _inputs(batch=2, length=6, seed=0):
    ids = np.random.default_rng(seed).integers(1, V, size=(batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")}


def _snapshot(model):
    return [(w.path, w.trainable, to_numpy(w)) for w in model.weights]


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert [(p, t) for p, t, _ in after] == [(p, t) for p, t, _ in before]
    for (path, _, a), (_, _, b) in zip(after, before):
        np.testing.assert_array_equal(a, b, err_msg=path)


# -- adapter files that do not fit ------------------------------------------
# tests/test_adapter_io.py covers another rank, layer set, width, target set
# and prior, a truncated tail, a flipped data byte, a foreign safetensors
# file and a wrong suffix; these are the other faults.


def _rewrite(path, metadata=None, arrays=None, drop=None):
    """Writes the adapter at `path` again with edited header entries or tensors."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(path, framework="numpy") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    header.update(metadata or {})
    tensors.update(arrays or {})
    for key in drop or ():
        tensors.pop(key)
    save_file(tensors, path, metadata=header)


def _fault(path, case):
    if case == "empty file":
        open(path, "wb").close()
    elif case == "cut inside the header":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:40])
    elif case == "header length garbage":
        data = bytearray(open(path, "rb").read())
        data[:8] = (2**62).to_bytes(8, "little")
        open(path, "wb").write(bytes(data))
    elif case == "newer format version":
        _rewrite(path, {"format_version": "2", "keras_qlora_version": "9.0.0"})
    elif case == "damaged header JSON":
        _rewrite(path, {"memory": '{"num_atoms": 4, "rank":'})
    elif case == "header entry missing":
        _strip_entry(path, "layers")
    elif case == "tensor missing":
        _rewrite(path, drop=["memory/atoms"])
    elif case == "tensor replaced":
        _rewrite(path, arrays={"memory/atoms": np.zeros((4, 2, 2), "float32")})
    elif case == "from another backbone":
        keras_qlora.save_adapter(_enabled("gemma"), path)


def _strip_entry(path, name):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(path, framework="numpy") as handle:
        header = {k: v for k, v in handle.metadata().items() if k != name}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, path, metadata=header)


def _enabled(name="llama"):
    backbone = _backbone(name)
    keras_qlora.enable(backbone, rank=2, num_atoms=4)
    randomize_adapters(backbone)
    return backbone


FAULTS = [
    ("empty file", "not a readable safetensors file"),
    ("cut inside the header", "not a readable safetensors file"),
    ("header length garbage", "not a readable safetensors file"),
    ("newer format version", "format version '2', written by keras_qlora '9.0.0'"),
    ("damaged header JSON", "header is damaged"),
    ("header entry missing", "header is damaged"),
    ("tensor missing", r"tensors \['memory/atoms'\] do not match"),
    ("tensor replaced", r"tensors \['memory/atoms'\] do not match"),
    ("from another backbone", "does not fit `model`"),
]


@pytest.mark.parametrize("case,message", FAULTS, ids=[f[0] for f in FAULTS])
@pytest.mark.parametrize("target", ["base backbone", "enabled backbone"])
def test_a_damaged_or_foreign_adapter_file_is_refused_whole(tmp_path, case, message, target):
    path = str(tmp_path / "adapter.safetensors")
    keras_qlora.save_adapter(_enabled(), path)
    _fault(path, case)
    model = _enabled() if target == "enabled backbone" else _backbone()
    memory, cls, before = keras_qlora.get_memory(model), type(model), _snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        keras_qlora.load_adapter(model, path)
    assert "Received: path=" in str(error.value)
    _assert_unchanged(model, before)
    assert keras_qlora.get_memory(model) is memory and type(model) is cls


def test_the_package_never_unpickles():
    pattern = re.compile(r"\bimport pickle\b|\bfrom pickle\b|cloudpickle|\bdill\b|\bmarshal\b|allow_pickle\s*=\s*True|torch\.load\(")
    found = []
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            text = open(os.path.join(PACKAGE, name)).read()
            found += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert found == []


def test_a_model_of_adapted_layers_loads_in_safe_mode(tmp_path):
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=3)
    for block, layer in enumerate(base.layers):
        keras_qlora.adapt(layer, memory, block=block)
    fresh = keras_qlora.QueryableLoRADense(3, memory=memory, block=2)
    model = keras.Sequential([base, fresh])
    model.build((None, 6))
    randomize_adapters(model)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


# -- properties of METHOD.md section 4, over random configurations ----------


@st.composite
def configurations(draw):
    num_atoms = draw(st.integers(1, 6))
    return dict(
        rank=draw(st.integers(1, 4)),
        num_atoms=num_atoms,
        top_k=draw(st.integers(1, num_atoms)),
        num_blocks=draw(st.integers(1, 3)),
        summary=draw(st.sampled_from(["attention", "ema", "none"])),
        routing=draw(st.sampled_from(["block", "layer"])),
        key_dim=draw(st.integers(1, 8)),
        summary_dim=draw(st.integers(1, 8)),
        positions=tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))),
        widths=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))),
        d_in=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
    )


def _memory_of(config, **overrides):
    keys = ("rank", "num_atoms", "top_k", "num_blocks", "summary", "routing", "key_dim", "summary_dim")
    return keras_qlora.AtomMemory(**{**{k: config[k] for k in keys}, **overrides})


def _base_and_adapted(config):
    """A plain stack of `Dense` layers and an adapted copy of it, with the
    layers spread over the memory's blocks in depth order."""
    inputs = keras.Input((*config["positions"], config["d_in"]))
    h = inputs
    for width in config["widths"]:
        h = keras.layers.Dense(width, activation="tanh")(h)
    base = keras.Model(inputs, h)
    rng = np.random.default_rng(config["seed"])
    base.set_weights([rng.normal(size=w.shape).astype("float32") for w in base.weights])
    adapted = keras.models.clone_model(base)
    adapted.set_weights(base.get_weights())
    memory = _memory_of(config)
    dense = [l for l in adapted.layers if isinstance(l, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        keras_qlora.adapt(layer, memory, block=i * config["num_blocks"] // len(dense))
    x = rng.normal(size=(2, *config["positions"], config["d_in"])).astype("float32")
    return base, adapted, memory, dense, x


@PROPERTIES
@given(configurations())
def test_property_1_zero_b_gives_the_base_output_exactly(config):
    base, adapted, _, _, x = _base_and_adapted(config)
    np.testing.assert_array_equal(to_numpy(adapted(x)), to_numpy(base(x)))


@PROPERTIES
@given(configurations())
def test_property_3_routing_weights_are_a_top_k_distribution(config):
    memory = _memory_of(config)
    z = np.random.default_rng(config["seed"]).normal(size=(2, *config["positions"], config["rank"]))
    for block in range(config["num_blocks"]):
        alpha = to_numpy(memory.route(z.astype("float32"), block).alpha)
        assert alpha.shape == (2, *config["positions"], config["num_atoms"])
        assert (alpha >= 0).all()
        np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_array_equal((alpha > 0).sum(-1), config["top_k"])


def _one_adapted_layer(config):
    memory = _memory_of(config, num_blocks=1)
    layer = keras_qlora.QueryableLoRADense(config["widths"][0], memory=memory, lora_alpha=2.0 * config["rank"])
    layer.build((None, config["d_in"]))
    rng = np.random.default_rng(config["seed"])
    layer.qlora_b.assign(rng.normal(size=layer.qlora_b.shape).astype("float32"))
    memory.atoms.assign(rng.normal(size=memory.atoms.shape).astype("float32"))
    x = rng.normal(size=(5, config["d_in"])).astype("float32")
    with memory.capture_routing() as records:
        delta = to_numpy(layer(x)) - to_numpy(layer.bias) - x.astype("float64") @ to_numpy(layer.kernel)
    return layer, memory, x, delta, to_numpy(records[0]["alpha"])


@PROPERTIES
@given(configurations())
def test_property_5_the_update_is_bounded_by_operator_norms(config):
    layer, memory, x, delta, _ = _one_adapted_layer(config)
    norm = lambda m: np.linalg.norm(m, 2)  # noqa: E731
    bound = layer.lora_scale * norm(to_numpy(layer.qlora_a)) * norm(to_numpy(layer.qlora_b)) * max(
        norm(u) for u in to_numpy(memory.atoms)
    )
    for row, update in zip(x, delta):
        assert np.linalg.norm(update) <= bound * np.linalg.norm(row) * (1 + 1e-4) + 1e-5


@PROPERTIES
@given(configurations())
def test_property_6_each_position_is_updated_by_the_rank_r_map_s_a_r_b(config):
    layer, memory, x, delta, alpha = _one_adapted_layer(config)
    a, b, atoms = to_numpy(layer.qlora_a), to_numpy(layer.qlora_b), to_numpy(memory.atoms)
    for row, update, weights in zip(x, delta, alpha):
        operator = layer.lora_scale * a @ np.einsum("m,mij->ij", weights, atoms) @ b
        assert np.linalg.matrix_rank(operator) <= config["rank"]
        np.testing.assert_allclose(update, row @ operator, rtol=1e-4, atol=1e-4)


@PROPERTIES
@given(configurations().filter(lambda c: c["num_atoms"] >= 2 and c["top_k"] >= 2))
def test_property_9_block_0_routing_reaches_block_1_through_the_summary(config):
    rng = np.random.default_rng(config["seed"])
    x = rng.normal(size=(2, 4)).astype("float32")
    first = rng.normal(size=(4, config["rank"])).astype("float32")
    second = -first  # the routing reads `z` through an RMS norm: only its direction counts
    for summary in ("attention", "ema", "none"):
        memory = _memory_of(config, num_blocks=2, summary=summary)
        if memory.atom_values is not None:
            memory.atom_values.assign(rng.normal(size=memory.atom_values.shape).astype("float32") * 3)
        layers = [keras_qlora.QueryableLoRADense(4, memory=memory, block=block) for block in range(2)]
        for layer in layers:
            layer.build((None, 4))
        alphas = []
        for a0 in (first, second):  # only block 0's routing changes
            layers[0].qlora_a.assign(a0)
            with memory.capture_routing() as records:
                layers[1](layers[0](x))
            alphas.append(to_numpy(records[1]["alpha"]))
        changed = not np.allclose(alphas[0], alphas[1], atol=1e-7)
        assert changed == (summary != "none"), summary


# -- numerics ---------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e30, 1e-30, 0.0])
@pytest.mark.parametrize("temperature", [1.0, 1e-6])
def test_extreme_activations_and_logits_route_to_finite_distributions(scale, temperature):
    memory = keras_qlora.AtomMemory(num_atoms=6, rank=3, top_k=2, temperature=temperature)
    layer = keras_qlora.QueryableLoRADense(4, memory=memory)
    layer.build((None, 5))
    layer.qlora_b.assign(np.full(layer.qlora_b.shape, 1e-3, "float32"))
    x = (np.random.default_rng(0).normal(size=(3, 5)) * scale).astype("float32")
    with memory.capture_routing() as records:
        out = to_numpy(layer(x))
    alpha = to_numpy(records[0]["alpha"])
    assert np.isfinite(out).all() and np.isfinite(alpha).all() and (alpha >= 0).all()
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-6)
    assert ((alpha > 0).sum(-1) <= 2).all()


def test_tied_logits_give_a_finite_distribution():
    memory = keras_qlora.AtomMemory(num_atoms=5, rank=2, top_k=2)
    memory.keys.assign(np.ones(memory.keys.shape, "float32"))  # every logit equal
    alpha = to_numpy(memory.route(np.ones((3, 2), "float32"), 0).alpha)
    assert np.isfinite(alpha).all() and (alpha >= 0).all()
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-6)


def test_very_negative_logits_still_select_the_top_k():
    logits = np.array([[-3e9, -4e9, -5e9], [-2e10, -1e10, -3e10]], "float32")
    alpha = to_numpy(keras_qlora.routing.top_k_softmax(ops.convert_to_tensor(logits), 1))
    np.testing.assert_array_equal(alpha, [[1, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
def test_float16_policies_stay_finite_and_close_to_float32(policy):
    def run(weights=None):
        # A dense softmax (top_k = num_atoms): a top-k choice could flip
        # between near-equal logits at half precision, a jump no tolerance fits.
        memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, top_k=4, num_blocks=2)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
        for block, layer in enumerate(model.layers):
            keras_qlora.adapt(layer, memory, block=block)
        if weights is None:
            randomize_adapters(model, scale=0.1)
        else:
            model.set_weights(weights)
        x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
        with memory.capture_routing() as records:
            out = model(x)
        return model, out, [r["alpha"] for r in records]

    reference, expected, _ = run()
    keras.config.set_dtype_policy(policy)
    _, out, alphas = run(reference.get_weights())
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert all(keras.backend.standardize_dtype(a.dtype) == "float32" for a in alphas)
    assert np.isfinite(to_numpy(out)).all()
    np.testing.assert_allclose(to_numpy(out), to_numpy(expected), rtol=2e-2, atol=2e-2)


# -- seeds ------------------------------------------------------------------


def test_the_same_seed_gives_the_same_adapter_and_outputs():
    def build():
        keras.utils.set_random_seed(42)
        memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=2, prior=keras_qlora.InstructionPrior(3))
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh")])
        keras_qlora.adapt(model.layers[0], memory, block=0, b_initializer="random_normal")
        model.add(keras_qlora.QueryableLoRADense(3, memory=memory, block=1, b_initializer="random_normal"))
        return model

    first, second = build(), build()
    assert [w.name for w in first.weights] == [w.name for w in second.weights]
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    np.testing.assert_array_equal(to_numpy(first(x)), to_numpy(second(x)))


# -- interrupted training -----------------------------------------------------


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, after_epoch):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt(f"stopped after epoch {epoch}")


def _trainable_model():
    keras.utils.set_random_seed(3)
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=2)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    for block, layer in enumerate(model.layers):
        keras_qlora.adapt(layer, memory, block=block)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")
    fit = dict(x=x, y=y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    straight = _trainable_model()
    expected_loss = straight.fit(**fit).history["loss"]

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        _trainable_model().fit(**fit, callbacks=[backup, _Interrupt(after_epoch=0)])
    resumed = _trainable_model()  # a new process would build it again
    history = resumed.fit(**fit, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])

    assert len(history.history["loss"]) == 2  # epochs 2 and 3 only
    np.testing.assert_allclose(history.history["loss"], expected_loss[1:], rtol=1e-5)
    for got, expected in zip(resumed.weights, straight.weights):
        np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-5, atol=1e-6, err_msg=got.path)


# -- threads ----------------------------------------------------------------


def test_two_threads_running_an_enabled_backbone_match_sequential_runs():
    backbone = _enabled()
    inputs = [_inputs(seed=1), _inputs(seed=2)]
    expected = [to_numpy(backbone(x)) for x in inputs]
    results, errors = [[], []], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i].append(to_numpy(backbone(inputs[i])))
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for i in range(2):
        for got in results[i]:
            np.testing.assert_array_equal(got, expected[i])
