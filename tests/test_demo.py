"""The regression demo (`examples/regression_demo.py`) in its smoke configuration."""

import importlib.util
import json
import math
import pathlib

import keras
import numpy as np
import pytest

import keras_qlora

DEMO_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "regression_demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("regression_demo", DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return _load_demo()


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = {**demo.SMOKE_CONFIG, "out": str(out)}
    results = demo.run(config, keep_models=True, log=lambda *args: None)
    return out, results


def _size(weights):
    return sum(math.prod(w.shape) for w in {id(w): w for w in weights}.values())


def _numpy(weight):
    return keras.ops.convert_to_numpy(weight)


def test_results_json(demo, smoke):
    out, results = smoke
    path = out / "results.json"
    assert path.exists()
    saved = json.loads(path.read_text())
    assert saved["backend"] == keras.backend.backend()
    assert math.isfinite(saved["base_test_mse"])
    assert set(saved["arms"]) == set(demo.ARMS)
    seeds = saved["config"]["seeds"]
    assert seeds == demo.SMOKE_CONFIG["seeds"]
    for arm, entry in saved["arms"].items():
        assert len(entry["test_mse"]) == seeds, arm
        assert all(math.isfinite(mse) for mse in entry["test_mse"]), arm
        assert entry["base_weights_unchanged"] == [True] * seeds, arm
        assert entry["test_mse"] == results["arms"][arm]["test_mse"]


def test_parameter_counts_come_from_the_models(demo, smoke):
    _, results = smoke
    arms, models = results["arms"], results["models"]
    for arm in (demo.ARM_STATIC, demo.ARM_QLORA):
        for model in models[arm]:
            counts = keras_qlora.count_parameters(model)
            assert arms[arm]["trainable_params"] == counts["trainable"], arm
            assert counts["trainable"] == _size(model.trainable_weights)
            assert counts["trainable"] == counts["adapters"] + counts["memory"]
    dense_shapes = [layer.kernel.shape for layer in demo.dense_layers(results["pretrained"])]
    lora_rank = arms[demo.ARM_LORA]["rank"]
    for model in models[demo.ARM_LORA]:
        assert arms[demo.ARM_LORA]["trainable_params"] == _size(model.trainable_weights)
        # Keras's Dense LoRA: A (d_in, r) and B (r, d_out) only; bias frozen.
        assert _size(model.trainable_weights) == lora_rank * sum(a + b for a, b in dense_shapes)
    # Matched from the LoRA side: the smallest rank with at least as many.
    qlora = arms[demo.ARM_QLORA]["trainable_params"]
    assert arms[demo.ARM_LORA]["trainable_params"] >= qlora
    assert (lora_rank - 1) * sum(a + b for a, b in dense_shapes) < qlora
    # The printed table shows the same numbers.
    table = demo.format_table(results)
    for arm in demo.ARMS:
        assert f"| {arm} | {arms[arm]['rank']} |" in table
        assert f"{arms[arm]['trainable_params']:,}" in table


def test_frozen_base_weights_bit_identical(demo, smoke):
    _, results = smoke
    pretrained = demo.dense_layers(results["pretrained"])
    for arm in demo.ARMS:
        for model in results["models"][arm]:
            layers = demo.dense_layers(model)
            assert len(layers) == len(pretrained)
            trainable_ids = {id(w) for w in model.trainable_weights}
            moved = False
            for layer, ref in zip(layers, pretrained):
                frozen = {w.name: w for w in layer.non_trainable_weights}
                assert set(frozen) == {"kernel", "bias"}, (arm, layer.name)
                for name, ref_weight in (("kernel", ref.kernel), ("bias", ref.bias)):
                    assert id(frozen[name]) not in trainable_ids
                    assert np.array_equal(_numpy(frozen[name]), _numpy(ref_weight)), (arm, layer.name, name)
                # B starts at zero: a non-zero B shows training did run.
                up = layer.lora_kernel_b if arm == demo.ARM_LORA else layer.qlora_b
                moved = moved or bool(np.any(_numpy(up) != 0))
            assert moved, arm
