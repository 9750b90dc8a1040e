"""Adapter files (`save_adapter` / `load_adapter`), `.keras` files of enabled
KerasHub tasks, and `disable_adapter`."""

import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

import keras_qlora
from backbones import FAMILIES, hidden, token_inputs
from conftest import randomize_adapters
from reference import to_numpy

HERE = os.path.dirname(os.path.abspath(__file__))


def _backbone(name="llama", **overrides):
    backbone_cls, _, kwargs = FAMILIES[name]
    return backbone_cls(**{**kwargs, **overrides})


def _twin(backbone, name="llama", **overrides):
    """A fresh backbone of the same config with the same base weights."""
    twin = _backbone(name, **overrides)
    twin.set_weights(backbone.get_weights())
    return twin


def _snapshot(model):
    return [(w.path, w.trainable, to_numpy(w).copy()) for w in model.weights]


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert [(p, t) for p, t, _ in after] == [(p, t) for p, t, _ in before]
    for (_, _, a), (_, _, b) in zip(after, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["llama", "gemma", "bert"])
def test_an_adapter_file_recreates_the_adapter_on_a_fresh_base(tmp_path, name):
    backbone = _backbone(name)
    fresh = _twin(backbone, name)
    keras_qlora.enable(backbone, rank=4, num_atoms=8, summary="ema", layers_to_transform=[1], lora_alpha=8.0)
    randomize_adapters(backbone, scale=0.5)
    x = token_inputs(backbone)
    expected = hidden(backbone, x)
    path = tmp_path / "adapter.safetensors"
    keras_qlora.save_adapter(backbone, path)
    assert not np.allclose(hidden(fresh, x), expected)

    memory = keras_qlora.load_adapter(fresh, path)
    assert memory is keras_qlora.get_memory(fresh) and memory.summary == "ema"
    np.testing.assert_array_equal(hidden(fresh, x), expected)
    assert not any(w.trainable for w in fresh.weights if "qlora" not in w.path and "memory" not in w.path)
    # Loading again into the enabled backbone replaces the weights in place.
    randomize_adapters(fresh, scale=0.1, seed=3)
    keras_qlora.load_adapter(fresh, path)
    np.testing.assert_array_equal(hidden(fresh, x), expected)


def test_the_file_holds_the_adapter_only_keyed_by_layer_path(tmp_path):
    backbone = _backbone()
    keras_qlora.enable(backbone, rank=4, num_atoms=8)
    path = tmp_path / "adapter.safetensors"
    keras_qlora.save_adapter(backbone, path)
    metadata, arrays = keras_qlora.read_adapter(path)
    layer_keys = sorted(k for k in arrays if k.endswith("/qlora_a"))
    assert layer_keys == [
        f"transformer_layer_{i}/self_attention/{p}/qlora_a" for i in (0, 1) for p in ("query", "value")
    ]
    assert arrays["memory/atoms"].shape == (8, 4, 4)
    assert not any(k.endswith("/kernel") or "gate" in k for k in arrays)
    assert metadata["enable"]["rank"] == 4 and metadata["keras_version"] == keras.__version__
    assert metadata["backend"] == keras.backend.backend()


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) - 40]
    else:  # flip one byte of the last tensor's data
        data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "case,message",
    [
        ("other rank", "rank: file 4, model 2"),
        ("more layers", "the file has tensors the backbone lacks: \\['transformer_layer_2"),
        ("other width", "shapes differ"),
        ("other targets", "the model has adapter weights the file lacks"),
        ("other prior", "prior embedding_dim: file 5, model None"),
        ("truncated", "not a readable safetensors file"),
        ("corrupted", "damaged: tensors"),
        ("not an adapter", "not a keras_qlora adapter"),
        ("wrong suffix", "ending in '.safetensors'"),
    ],
)
def test_a_file_that_does_not_fit_raises_and_changes_nothing(tmp_path, case, message):
    source = _backbone(**({"num_layers": 3} if case == "more layers" else {}))
    prior = keras_qlora.InstructionPrior(embedding_dim=5) if case == "other prior" else None
    keras_qlora.enable(source, rank=4, num_atoms=8, prior=prior)
    path = str(tmp_path / "adapter.safetensors")
    keras_qlora.save_adapter(source, path)
    target = _backbone(**({"hidden_dim": 48} if case == "other width" else {}))
    if case in ("other rank", "other prior"):
        keras_qlora.enable(target, rank=2 if case == "other rank" else 4, num_atoms=8)
    if case == "other targets":
        keras_qlora.enable(target, rank=4, num_atoms=8, target_layer_names=["query", "value", "key"])
    if case in ("truncated", "corrupted"):
        _damage(path, case)
    if case == "not an adapter":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(3, "float32")}, path)
    if case == "wrong suffix":
        path = path.replace(".safetensors", ".h5")
    enabled_before = keras_qlora.get_memory(target)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        keras_qlora.load_adapter(target, path)
    _assert_unchanged(target, before)
    assert keras_qlora.get_memory(target) is enabled_before


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        keras_qlora.load_adapter(_backbone(), tmp_path / "nowhere.safetensors")


def _lm(name="llama", prior_dim=None):
    backbone_cls, lm_cls, kwargs = FAMILIES[name]
    backbone = backbone_cls(**kwargs)
    prior = None if prior_dim is None else keras_qlora.InstructionPrior(embedding_dim=prior_dim, prior_strength=2.0)
    lm = lm_cls(backbone=backbone, preprocessor=None)
    keras_qlora.enable(backbone, rank=4, num_atoms=8, prior=prior)
    randomize_adapters(backbone, scale=0.5)
    return lm


def test_an_enabled_task_round_trips_through_a_keras_file(tmp_path):
    lm = _lm(prior_dim=3)
    lm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = token_inputs(lm.backbone)
    expected = to_numpy(lm(x))
    lm.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras", safe_mode=True)
    memory = keras_qlora.get_memory(loaded.backbone)
    assert memory is not None and memory.prior.embedding_dim == 3
    assert type(loaded.backbone).__name__ == type(lm.backbone).__name__
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
    def trainable(model):
        return sorted((w.name, tuple(w.shape)) for w in model.trainable_weights)

    assert trainable(loaded) == trainable(lm)


_OTHER_BACKEND_SCRIPT = """
import sys, numpy as np, keras
sys.path.insert(0, {here!r})
keras.utils.set_random_seed(0)
import keras_qlora, test_adapter_io as t
lm = t._lm(prior_dim=3)
lm.backbone.save_weights({base!r})  # base and adapter weights, for the twin
keras_qlora.save_adapter(lm, {adapter!r})
lm.save({model!r})
x = t.token_inputs(lm.backbone)
with keras_qlora.use_instruction(lm, np.array([1.0, -2.0, 0.5], "float32")):
    np.save({out!r}, keras.ops.convert_to_numpy(lm(x)))
"""


def test_files_written_under_another_backend_load_with_the_same_outputs(tmp_path):
    backends = ["tensorflow", "torch", "jax"]
    other = backends[(backends.index(keras.backend.backend()) + 1) % 3]
    files = {k: str(tmp_path / f) for k, f in (
        ("base", "base.weights.h5"), ("adapter", "adapter.safetensors"), ("model", "lm.keras"), ("out", "out.npy")
    )}
    env = dict(os.environ, KERAS_BACKEND=other, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    subprocess.run(
        [sys.executable, "-c", _OTHER_BACKEND_SCRIPT.format(here=HERE, **files)],
        env=env, check=True, capture_output=True, timeout=300,
    )
    expected = np.load(files["out"])
    instruction = np.array([1.0, -2.0, 0.5], "float32")

    loaded = keras.saving.load_model(files["model"], safe_mode=True)
    # A base backbone with the same base weights, then the adapter file.
    backbone_cls, lm_cls, kwargs = FAMILIES["llama"]
    twin = backbone_cls(**kwargs)
    keras_qlora.enable(twin, rank=4, num_atoms=8, prior=keras_qlora.InstructionPrior(embedding_dim=3))
    twin.load_weights(files["base"])  # only to copy the base weights over
    base = [to_numpy(w) for w in twin.weights if "qlora" not in w.path and "memory" not in w.path]
    fresh = backbone_cls(**kwargs)
    fresh.set_weights(base)
    keras_qlora.load_adapter(fresh, files["adapter"])
    fresh_lm = lm_cls(backbone=fresh, preprocessor=None)
    for model in (loaded, fresh_lm):
        with keras_qlora.use_instruction(model, instruction):
            np.testing.assert_allclose(to_numpy(model(token_inputs(model.backbone))), expected, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_the_base_model_even_in_compiled_functions():
    backbone_cls, lm_cls, kwargs = FAMILIES["llama"]
    lm = lm_cls(backbone=backbone_cls(**kwargs), preprocessor=None)
    x = token_inputs(lm.backbone)
    base = to_numpy(lm.predict(x, verbose=0))
    base_eager = to_numpy(lm(x))
    # The task itself, so that its predict function (traced above) is rebuilt.
    keras_qlora.enable(lm, rank=4, num_atoms=8)
    randomize_adapters(lm.backbone, scale=0.5)
    adapted = to_numpy(lm.predict(x, verbose=0))
    assert not np.allclose(adapted, base)
    with keras_qlora.disable_adapter(lm):
        np.testing.assert_array_equal(to_numpy(lm.predict(x, verbose=0)), base)
        np.testing.assert_array_equal(to_numpy(lm(x)), base_eager)
    np.testing.assert_array_equal(to_numpy(lm.predict(x, verbose=0)), adapted)
    with pytest.raises(ValueError, match="no Queryable LoRA adapter"):
        with keras_qlora.disable_adapter(keras_hub.models.LlamaBackbone(**kwargs)):
            pass
