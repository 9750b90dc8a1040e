"""Freezing the routing and folding the adapter into the kernels."""

import numpy as np
import pytest

import keras_qlora
from backbones import FAMILIES, hidden, token_inputs
from conftest import randomize_adapters
from reference import to_numpy


def _task(name, num_atoms):
    backbone_cls, lm_cls, kwargs = FAMILIES[name]
    backbone = backbone_cls(**kwargs)
    model = lm_cls(backbone=backbone, preprocessor=None) if lm_cls else backbone
    keras_qlora.enable(model, rank=4, num_atoms=num_atoms, top_k=1 if num_atoms == 1 else 2)
    randomize_adapters(backbone, scale=0.5)
    return model


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2", "bert"])
def test_with_one_atom_the_merged_model_equals_the_adapted_one(name):
    # One atom: the routing is constant, so folding it away is exact.
    model = _task(name, num_atoms=1)
    x = token_inputs(model)
    adapted = hidden(model, x)
    weights_before = [to_numpy(w) for w in model.weights]
    merged = keras_qlora.merge_adapter(model, np.ones(1, "float32"))
    np.testing.assert_allclose(hidden(merged, x), adapted, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(l, keras_qlora.layers.QueryableLoRAMixin) for l in merged._flatten_layers())
    assert type(merged).__name__ == type(model).__name__ and keras_qlora.get_memory(getattr(merged, "backbone", merged)) is None
    for w, before in zip(model.weights, weights_before):  # the adapted model is untouched
        np.testing.assert_array_equal(to_numpy(w), before)
    with keras_qlora.disable_adapter(model):
        assert not np.allclose(hidden(model, x), adapted)


def test_calibrated_routing_is_the_masked_mean_of_the_routing_weights():
    model = _task("llama", num_atoms=8)
    x = token_inputs(model)
    x["padding_mask"][1, 4:] = False
    memory = keras_qlora.get_memory(model.backbone)
    with memory.capture_routing() as records:
        model(x)
    means = keras_qlora.calibrate_routing(model, x)
    assert len(means) == 4
    mask = x["padding_mask"].astype("float64")[..., None]
    for record in records:
        alpha = to_numpy(record["alpha"]).astype("float64")
        expected = (alpha * mask).sum((0, 1)) / mask.sum()
        np.testing.assert_allclose(means[record["caller"]], expected, rtol=1e-6)
        assert abs(means[record["caller"]].sum() - 1) < 1e-5
    merged = keras_qlora.merge_adapter(model, means)
    # A frozen routing approximates the routed model: closer to it than the base.
    adapted, frozen = hidden(model, x), hidden(merged, x)
    with keras_qlora.disable_adapter(model):
        base = hidden(model, x)
    assert np.abs(frozen - adapted).mean() < np.abs(base - adapted).mean()


def test_merge_rejects_bad_routing_and_plain_models():
    model = _task("llama", num_atoms=4)
    with pytest.raises(ValueError, match="4 non-negative weights summing to 1"):
        keras_qlora.merge_adapter(model, np.ones(3, "float32") / 3)
    with pytest.raises(ValueError, match="summing to 1"):
        keras_qlora.merge_adapter(model, np.ones(4, "float32"))
    backbone_cls, _, kwargs = FAMILIES["llama"]
    with pytest.raises(ValueError, match="after `keras_qlora.enable`"):
        keras_qlora.merge_adapter(backbone_cls(**kwargs), np.ones(4) / 4)
