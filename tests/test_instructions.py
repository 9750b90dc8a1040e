"""The instruction prior on the retrofit path: per-example instructions in
`fit` (`InstructedModel`), one instruction per `generate` call
(`use_instruction`), and `embed_instructions`."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_qlora
from backbones import FAMILIES, V
from conftest import randomize_adapters
from reference import to_numpy

E = 4  # instruction embedding width


def _lm(name="llama", strength=20.0, **overrides):
    backbone_cls, lm_cls, kwargs = FAMILIES[name]
    backbone = backbone_cls(**{**kwargs, **overrides})
    lm = lm_cls(backbone=backbone, preprocessor=None)
    prior = keras_qlora.InstructionPrior(embedding_dim=E, prior_strength=strength)
    keras_qlora.enable(lm, rank=4, num_atoms=8, top_k=2, prior=prior)
    return lm


def _instructions():
    # Under a strong prior each selects its own pair of atoms.
    rng = np.random.default_rng(5)
    return rng.normal(0, 3, size=(2, E)).astype("float32")


def _greedy(lm, ids, mask, prompt_length, instruction):
    """Greedy decoding by full forward passes, routed through the memory's
    thread-local instruction: independent of `generate` and its compilation."""
    expected = ids.copy()
    memory = keras_qlora.find_memory(lm)
    tiled = np.repeat(instruction[None], len(ids), axis=0)
    with memory.use_instruction(tiled):
        for t in range(prompt_length, ids.shape[1]):
            logits = to_numpy(lm({"token_ids": expected[:, :t], "padding_mask": np.ones((len(ids), t), bool)}))
            expected[:, t] = logits[:, -1].argmax(-1)
    return expected


def test_each_generate_call_routes_with_its_own_instruction():
    lm = _lm()
    randomize_adapters(lm.backbone, scale=1.0)
    lm.compile(sampler="greedy")
    prompt_length, total = 3, 6
    ids = np.zeros((2, total), "int32")
    ids[:, :prompt_length] = [[5, 17, 40], [90, 3, 66]]
    mask = np.zeros((2, total), bool)
    mask[:, :prompt_length] = True
    first, second = _instructions()
    outputs = []
    for instruction in (first, second, first):  # the first call compiles generate
        with keras_qlora.use_instruction(lm, instruction):
            out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        outputs.append(to_numpy(out["token_ids"]).astype("int32"))
    np.testing.assert_array_equal(outputs[0], _greedy(lm, ids, mask, prompt_length, first))
    np.testing.assert_array_equal(outputs[1], _greedy(lm, ids, mask, prompt_length, second))
    np.testing.assert_array_equal(outputs[2], outputs[0])
    assert not np.array_equal(outputs[0], outputs[1])
    wrapped = keras_qlora.InstructedModel(lm).generate(
        {"token_ids": ids, "padding_mask": mask}, instruction=second, stop_token_ids=None
    )
    np.testing.assert_array_equal(to_numpy(wrapped["token_ids"]).astype("int32"), outputs[1])


def test_use_instruction_restores_the_previous_one_and_checks_its_input():
    lm = _lm()
    randomize_adapters(lm.backbone, scale=1.0)
    x = {"token_ids": np.array([[4, 8, 15, 16]], "int32"), "padding_mask": np.ones((1, 4), bool)}
    plain = to_numpy(lm(x))
    first, second = _instructions()
    with keras_qlora.use_instruction(lm, first):
        with_first = to_numpy(lm(x))
        with keras_qlora.use_instruction(lm, second[None]):
            assert not np.allclose(to_numpy(lm(x)), with_first)
        np.testing.assert_array_equal(to_numpy(lm(x)), with_first)
    np.testing.assert_array_equal(to_numpy(lm(x)), plain)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        with keras_qlora.use_instruction(lm, _instructions()):
            pass
    backbone_cls, lm_cls, kwargs = FAMILIES["llama"]
    no_prior = lm_cls(backbone=backbone_cls(**kwargs), preprocessor=None)
    keras_qlora.enable(no_prior, rank=4, num_atoms=8)
    with pytest.raises(ValueError, match="no `InstructionPrior`"):
        with keras_qlora.use_instruction(no_prior, first):
            pass


def _task_corpus(n=32, length=10):
    """Two tasks on the same prompts: continue counting by 1 or by 2."""
    rng = np.random.default_rng(0)
    starts = rng.integers(1, V // 3, size=n)
    task = np.arange(n) % 2
    ids = np.stack([(s + (t + 1) * np.arange(length)) % (V - 1) + 1 for s, t in zip(starts, task)]).astype("int32")
    instructions = _instructions()[task]
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1], bool), "instruction": instructions}
    return x, ids[:, 1:]


def test_instructed_model_fits_with_one_instruction_per_example():
    lm = _lm(strength=1.0)
    model = keras_qlora.InstructedModel(lm)
    frozen = {w.path: to_numpy(w) for w in lm.backbone.weights if not w.trainable}
    x, y = _task_corpus()
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=keras.backend.backend() != "torch",
    )
    before = model.evaluate(x, y, batch_size=16, verbose=0)
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    after = model.evaluate(x, y, batch_size=16, verbose=0)
    assert after < before - 0.05
    for w in lm.backbone.weights:
        if w.path in frozen:
            np.testing.assert_array_equal(to_numpy(w), frozen[w.path])
    # Each row is routed with its own instruction: the batch equals the rows
    # run one by one under `use_instruction`.
    batch = to_numpy(model({k: v[:4] for k, v in x.items()}))
    for i in range(4):
        with keras_qlora.use_instruction(lm, x["instruction"][i]):
            row = to_numpy(lm({"token_ids": x["token_ids"][i : i + 1], "padding_mask": x["padding_mask"][i : i + 1]}))
        np.testing.assert_allclose(batch[i : i + 1], row, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'instruction' entry"):
        model({"token_ids": x["token_ids"][:1], "padding_mask": x["padding_mask"][:1]})


def test_mean_pooled_token_embeddings_match_the_table():
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=256, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=8, intermediate_dim=16
    )
    tokenizer = keras_hub.tokenizers.ByteTokenizer()
    got = keras_qlora.embed_instructions(["ab", "xyz"], backbone, tokenizer=tokenizer)
    table = to_numpy(backbone.token_embedding.embeddings)
    expected = np.stack([table[[97, 98]].mean(0), table[[120, 121, 122]].mean(0)])
    assert got.dtype == np.float32 and got.shape == (2, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        keras_qlora.embed_instructions("ab", backbone)
    with pytest.raises(ValueError, match="texts=\\[\\]"):
        keras_qlora.embed_instructions([], backbone, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no tokens. Received: text=''"):
        keras_qlora.embed_instructions([""], backbone, tokenizer=tokenizer)


def test_a_text_embedder_gives_sentence_embeddings():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "reverse", "the", "word", "sort", "list"]
    tokenizer = keras_hub.tokenizers.BertTokenizer(vocabulary=vocab)
    preprocessor = keras_hub.models.BertTextEmbedderPreprocessor(tokenizer=tokenizer, sequence_length=8)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16
    )
    embedder = keras_hub.models.BertTextEmbedder(backbone=backbone, preprocessor=preprocessor)
    got = keras_qlora.embed_instructions(["reverse the word", "sort the list"], embedder)
    assert got.shape == (2, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, embedder.encode_text(["reverse the word", "sort the list"], verbose=0), atol=1e-6)
    assert not np.allclose(got[0], got[1])
