"""`keras_qlora.enable` on tiny KerasHub backbones: one shared checker over a
table of families (METHOD.md section 4, properties 1, 7 and 8)."""

import numpy as np
import pytest
import keras
import keras_hub

import keras_qlora
from backbones import FAMILIES, V
from conftest import randomize_adapters
from reference import to_numpy

CAUSAL = [name for name, (_, lm, _) in FAMILIES.items() if lm is not None]


def _build(name):
    backbone_cls, lm_cls, kwargs = FAMILIES[name]
    backbone = backbone_cls(**kwargs)
    return backbone, (lm_cls(backbone=backbone, preprocessor=None) if lm_cls else None)


def _inputs(batch=2, length=8, seed=0):
    ids = np.random.default_rng(seed).integers(1, V, size=(batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")}


def _backbone_inputs(backbone, inputs):
    if "segment_ids" in [i.name for i in backbone.inputs]:
        return {**inputs, "segment_ids": np.zeros_like(inputs["token_ids"])}
    return inputs


def _hidden(backbone, inputs):
    out = backbone(_backbone_inputs(backbone, inputs))
    return to_numpy(out["sequence_output"] if isinstance(out, dict) else out)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_enable_adapts_queries_and_values_and_starts_at_the_base_model(name):
    backbone, _ = _build(name)
    inputs = _inputs()
    base = _hidden(backbone, inputs)
    base_weights = {w.path for w in backbone.weights}
    memory = keras_qlora.enable(backbone, rank=4, num_atoms=8)
    assert keras_qlora.get_memory(backbone) is memory
    adapted = [l for l in backbone._flatten_layers() if isinstance(l, keras_qlora.layers.QueryableLoRAMixin)]
    blocks = keras_qlora.find_blocks(backbone)
    assert sorted(l.name for l in adapted) == ["query", "query", "value", "value"]
    assert sorted(l.block for l in adapted) == [0, 0, 1, 1] and memory.num_blocks == len(blocks)
    assert base_weights <= {w.path for w in backbone.weights}
    trainable = {id(w) for w in backbone.trainable_weights}
    assert not any(id(w) in trainable for w in backbone.weights if w.path in base_weights)
    np.testing.assert_array_equal(_hidden(backbone, inputs), base)


def _enabled_lm(name):
    backbone, lm = _build(name)
    keras_qlora.enable(backbone, rank=4, num_atoms=8, top_k=2)
    randomize_adapters(backbone, scale=0.5)
    return backbone, lm


@pytest.mark.parametrize("name", CAUSAL)
def test_a_later_token_changes_no_earlier_output(name):
    backbone, _ = _enabled_lm(name)
    inputs = _inputs(batch=2, length=8)
    changed = {k: v.copy() for k, v in inputs.items()}
    changed["token_ids"][:, -1] = (changed["token_ids"][:, -1] % (V - 1)) + 1
    first, second = _hidden(backbone, inputs), _hidden(backbone, changed)
    np.testing.assert_allclose(first[:, :-1], second[:, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(first[:, -1], second[:, -1])


# keras-hub 0.32's Gemma3CausalLM.generate fails without a preprocessor
# ("Invalid dtype: object"), with or without adapters.
@pytest.mark.parametrize("name", [n for n in CAUSAL if n != "gemma3"])
def test_cached_generation_matches_greedy_full_forward_passes(name):
    _, lm = _enabled_lm(name)
    inputs = _inputs(batch=2, length=8)
    prompt_length, total = 3, 7
    ids = np.zeros((2, total), "int32")
    ids[:, :prompt_length] = inputs["token_ids"][:, :prompt_length]
    mask = np.zeros((2, total), bool)
    mask[:, :prompt_length] = True
    lm.compile(sampler="greedy")
    generated = to_numpy(lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)["token_ids"])
    expected = ids.copy()
    for t in range(prompt_length, total):
        logits = to_numpy(lm({"token_ids": expected[:, :t], "padding_mask": np.ones((2, t), bool)}))
        expected[:, t] = logits[:, -1].argmax(-1)
    np.testing.assert_array_equal(generated.astype("int32"), expected)


def _pattern_corpus(n=32, length=12):
    rows = [(np.arange(length) * (i % 3 + 1) + i) % (V - 1) + 1 for i in range(n)]
    ids = np.asarray(rows, "int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1], dtype="bool")}
    return x, ids[:, 1:]


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_fit_lowers_the_loss_and_keeps_base_weights(name):
    backbone, lm = _build(name)
    keras_qlora.enable(backbone, rank=4, num_atoms=8)
    frozen = {w.path: to_numpy(w) for w in lm.non_trainable_weights}
    x, y = _pattern_corpus()
    lm.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=keras.backend.backend() != "torch",
    )
    before = lm.evaluate(x, y, verbose=0, batch_size=16, return_dict=True)["loss"]
    lm.fit(x, y, epochs=12, batch_size=8, verbose=0)
    after = lm.evaluate(x, y, verbose=0, batch_size=16, return_dict=True)["loss"]
    assert after < before - 0.05
    for w in lm.non_trainable_weights:
        np.testing.assert_array_equal(to_numpy(w), frozen[w.path])


def test_text_classifier_fits_on_an_enabled_bert():
    backbone, _ = _build("bert")
    keras_qlora.enable(backbone, rank=4, num_atoms=8)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None)
    ids = np.random.default_rng(1).integers(1, V, size=(32, 10)).astype("int32")
    labels = (ids[:, 0] > V // 2).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool), "segment_ids": np.zeros_like(ids)}
    classifier.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    history = classifier.fit(x, labels, epochs=5, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_block_size_and_layers_to_transform():
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=V, num_layers=4, num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32
    )
    memory = keras_qlora.enable(backbone, rank=2, num_atoms=4, block_size=2, layers_to_transform=[1, 2, 3])
    blocks = keras_qlora.find_blocks(backbone)
    assert memory.num_blocks == 2
    assert not any(isinstance(l, keras_qlora.layers.QueryableLoRAMixin) for l in blocks[0]._flatten_layers())
    by_block = {
        i: sorted(l.block for l in b._flatten_layers() if isinstance(l, keras_qlora.layers.QueryableLoRAMixin))
        for i, b in enumerate(blocks)
    }
    assert by_block == {0: [], 1: [0, 0], 2: [1, 1], 3: [1, 1]}


def _snapshot(backbone):
    return [(w.path, w.trainable, to_numpy(w).copy()) for w in backbone.weights]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_layer_names": ["nothing"]}, "Layer names in block 0"),
        ({"target_layer_names": ["query"], "exclude": ["query"]}, "exclude=\\['query'\\]"),
        ({"layers_to_transform": [5]}, "layers_to_transform=\\[5\\]"),
        ({"layers_to_transform": 1}, "layers_to_transform=1"),
        ({"block_size": 0}, "block_size=0"),
        ({"rank": 0}, "rank=0"),
        ({"top_k": 9}, "top_k=9"),
        ({"lora_alpha": -2}, "lora_alpha=-2"),
    ],
)
def test_rejected_enable_leaves_the_backbone_unchanged(kwargs, message):
    backbone, _ = _build("llama")
    before = _snapshot(backbone)
    with pytest.raises(ValueError, match=message):
        keras_qlora.enable(backbone, **{"rank": 4, "num_atoms": 8, **kwargs})
    after = _snapshot(backbone)
    assert [(p, t) for p, t, _ in after] == [(p, t) for p, t, _ in before]
    for (_, _, a), (_, _, b) in zip(after, before):
        np.testing.assert_array_equal(a, b)
    assert keras_qlora.get_memory(backbone) is None


def test_enable_twice_and_unsupported_targets():
    backbone, _ = _build("gpt2")
    keras_qlora.enable(backbone, rank=4, num_atoms=8)
    with pytest.raises(ValueError, match="already enabled"):
        keras_qlora.enable(backbone, rank=4, num_atoms=8)
    other, _ = _build("gpt2")
    with pytest.raises(TypeError, match="LayerNormalization"):
        keras_qlora.enable(other, target_layer_names=["self_attention_layer_norm"])
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        keras_qlora.enable(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
