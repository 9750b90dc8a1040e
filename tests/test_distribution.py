"""Queryable LoRA under `keras.distribution` on JAX, on 8 virtual CPU devices.

XLA's device count is fixed when JAX starts, so the distributed runs happen
in a subprocess started with `--xla_force_host_platform_device_count=8`. It
compares `DataParallel` and `ModelParallel` (the adapter sharded beside the
kernels it adapts, the memory replicated) with a single-device run: the
forward outputs and one training step's loss and weights.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_qlora.distribution import layout_map

HERE = os.path.dirname(os.path.abspath(__file__))

_SCRIPT = r"""
import json, os, sys
import numpy as np
import keras
import keras_qlora
from keras_qlora.distribution import layout_map
sys.path.insert(0, {here!r})
from backbones import FAMILIES, V

devices = keras.distribution.list_devices("cpu")
assert len(devices) == 8, devices
mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 8)).astype("float32")
ids = rng.integers(1, V, size=(8, 6)).astype("int32")
tokens = {{"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")}}


def fill(model, seed):
    # The same values on every run, whatever the distribution.
    r = np.random.default_rng(seed)
    for w in model.weights:
        if w.trainable or "kernel" in w.path or "bias" in w.path or "embeddings" in w.path:
            w.assign(r.normal(0, 0.3, w.shape).astype("float32"))


def spec(variable):
    sharding = variable.value.sharding
    if not hasattr(sharding, "spec"):  # one device
        return []
    return [None if a is None else str(a) for a in sharding.spec]


def mlp(kind):
    layouts = None
    if kind == "data":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    elif kind == "model":
        layouts = keras.distribution.LayoutMap(mesh)
        layouts[".*up/kernel"] = (None, "model")      # column-parallel
        layouts[".*down/kernel"] = ("model", None)    # row-parallel
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="up"), keras.layers.Dense(8, name="down")])
    if layouts is not None:
        layout_map(model, layouts)
    memory = keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=2, name="memory")
    for block, layer in enumerate(model.layers):
        keras_qlora.adapt(layer, memory, block=block)
    fill(model, 1)
    out = model.predict(x, batch_size=16, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    loss = float(model.train_on_batch(x, y))
    result = {{"out": out.tolist(), "loss": loss, "weights": [np.asarray(w.value).tolist() for w in model.weights]}}
    result["specs"] = {{w.path: spec(w) for w in model.weights}}
    keras.distribution.set_distribution(None)
    return result


def llama(kind):
    backbone_cls, _, kwargs = FAMILIES["llama"]
    layouts = None
    if kind == "model":
        layouts = backbone_cls.get_layout_map(mesh)
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"))
    backbone = backbone_cls(**kwargs)
    if layouts is not None:
        layout_map(backbone, layouts)
    keras_qlora.enable(backbone, rank=2, num_atoms=4)
    fill(backbone, 2)
    out = backbone.predict(tokens, batch_size=8, verbose=0)
    result = {{"out": np.asarray(out).tolist(), "specs": {{w.path: spec(w) for w in backbone.weights}}}}
    keras.distribution.set_distribution(None)
    return result


results = {{f"mlp {{k}}": mlp(k) for k in ("single", "data", "model")}}
results.update({{f"llama {{k}}": llama(k) for k in ("single", "model")}})
json.dump(results, open({out!r}, "w"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if keras.backend.backend() != "jax":
        pytest.skip(
            "keras.distribution's DataParallel and ModelParallel run on JAX only; "
            "TensorFlow and PyTorch use their own multi-device strategies"
        )
    out = str(tmp_path_factory.mktemp("distribution") / "runs.json")
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
    )
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(here=HERE, out=out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.load(open(out))


@pytest.mark.parametrize("kind", ["data", "model"])
def test_a_distributed_forward_and_training_step_match_one_device(runs, kind):
    import numpy as np

    single, distributed = runs["mlp single"], runs[f"mlp {kind}"]
    np.testing.assert_allclose(distributed["out"], single["out"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(distributed["loss"], single["loss"], rtol=1e-5)
    for got, expected in zip(distributed["weights"], single["weights"]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_adapter_is_sharded_beside_its_kernel_and_the_memory_replicated(runs):
    specs = {path.split("/", 1)[1] if path.startswith("sequential") else path: axes
             for path, axes in runs["mlp model"]["specs"].items()}
    # Column-parallel `up`: B takes the kernel's output sharding.
    assert specs["up/kernel"] == [None, "model"]
    assert specs["up/qlora_a"] in ([None, None], [])
    assert specs["up/qlora_b"] == [None, "model"]
    # Row-parallel `down`: A takes the kernel's input sharding.
    assert specs["down/kernel"] == ["model", None]
    assert specs["down/qlora_a"] == ["model", None]
    assert specs["down/qlora_b"] in ([None, None], [])
    assert all(not any(axes) for path, axes in specs.items() if path.startswith("memory/"))


def test_an_enabled_kerashub_backbone_under_its_own_layout_map_matches_one_device(runs):
    import numpy as np

    specs = runs["llama model"]["specs"]
    query = "transformer_layer_0/self_attention/query"
    assert any(specs[f"{query}/kernel"])
    kernel_axes = specs[f"{query}/kernel"]
    assert specs[f"{query}/qlora_a"][:1] == kernel_axes[:1]
    assert specs[f"{query}/qlora_b"][1:] == kernel_axes[1:] or not any(kernel_axes[1:])
    np.testing.assert_allclose(runs["llama model"]["out"], runs["llama single"]["out"], rtol=1e-4, atol=1e-5)


def test_layout_map_refuses_what_is_not_a_layout_map():
    with pytest.raises(ValueError, match="base_layout_map=\\{\\}"):
        layout_map(keras.Sequential([keras.layers.Dense(2)]), {})
