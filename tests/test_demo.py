"""The regression study (`examples/regression_demo.py`) in its smoke configuration,
and its notebook (`examples/regression_demo.ipynb`, built by `tools/make_notebooks.py`)."""

import json
import math
import pathlib

import keras
import numpy as np
import pytest

import keras_qlora
from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def demo():
    return load_script("examples/regression_demo.py")


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    printed = []
    config = {**demo.SMOKE_CONFIG, "out": str(out)}
    results = demo.run(config, log=printed.append, progress=False)
    return out, results, printed


def _rows(table_text):
    """The first cell of every data row of the markdown table `table_text`."""
    cells = [line.split("|")[1].strip() for line in table_text.splitlines() if line.startswith("| ")]
    return cells[1:]  # the header's first cell is "arm"


def test_results_json_has_every_task_arm_and_seed(demo, smoke):
    out, results, _ = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["backend"] == keras.backend.backend()
    assert saved["command"].startswith(f"KERAS_BACKEND={keras.backend.backend()} ")
    assert saved["config"]["seeds"] == demo.SMOKE_CONFIG["seeds"]
    assert list(saved["tasks"]) == list(demo.TASKS)
    for task, entry in saved["tasks"].items():
        assert math.isfinite(entry["base_test_mse"])
        assert list(entry["arms"]) == list(demo.ARMS)
        for arm, arm_entry in entry["arms"].items():
            runs = arm_entry["runs"]
            assert [r["seed"] for r in runs] == list(range(demo.SMOKE_CONFIG["seeds"])), (task, arm)
            for run in runs:
                assert math.isfinite(run["test_mse"]) and math.isfinite(run["val_mse"]), (task, arm)
                assert len(run["window_losses"]) == 1, (task, arm)  # 2 steps, windows of 2
                assert run["test_mse"] == results["tasks"][task]["arms"][arm]["runs"][run["seed"]]["test_mse"]


def test_report_table_has_every_arm(demo, smoke):
    out, results, printed = smoke
    report = (out / "results.md").read_text()
    assert printed == [report]
    for task in demo.TASKS:
        section = report.split(f"## Task `{task}`")[1].split("## Task")[0]
        table = section.split("\n\n")[1]
        assert _rows(table) == ["Base (not adapted)", *demo.ARMS]
        for arm in demo.ARMS:
            params = results["tasks"][task]["arms"][arm]["runs"][0]["trainable_params"]
            assert f"| {arm} |" in table and f"| {params:,} |" in table


def test_parameters_matched_from_above(demo, smoke):
    _, results, _ = smoke
    pretrained, config = results["pretrained"], results["config"]
    budget = results["parameter_budget"]
    arms = results["tasks"]["regimes"]["arms"]
    counts = {arm: arms[arm]["runs"][0]["trainable_params"] for arm in demo.ARMS}
    ranks = {arm: arms[arm]["runs"][0]["rank"] for arm in demo.ARMS}
    assert budget == max(counts[arm] for arm in demo.QLORA_ARMS) == counts[demo.QLORA_PRIOR]
    assert len({ranks[arm] for arm in demo.QLORA_ARMS}) == 1
    for arm in (*demo.KERAS_LORA_ARMS, demo.STATIC):
        # At least the budget, and the smallest rank that gets there.
        assert counts[arm] >= budget, arm
        assert demo.expected_params(arm, pretrained, config, ranks[arm] - 1) < budget, arm
    shapes = [layer.kernel.shape for layer in demo.dense_layers(pretrained)]
    assert counts[demo.LORA] == counts[demo.RSLORA] == ranks[demo.LORA] * sum(a + b for a, b in shapes)
    for arm, entry in results["tasks"]["null"]["arms"].items():
        assert entry["runs"][0]["trainable_params"] == counts[arm], arm


def test_recorded_counts_are_those_of_the_built_models(demo, smoke):
    _, results, _ = smoke
    pretrained, config = results["pretrained"], results["config"]
    for arm in demo.ARMS:
        rank = results["tasks"]["regimes"]["arms"][arm]["runs"][0]["rank"]
        model, memory, info = demo.build_arm(arm, pretrained, config, rank)
        trainable = demo.num_params(model.trainable_weights)
        assert info["trainable_params"] == trainable == demo.expected_params(arm, pretrained, config, rank)
        if memory is not None:
            counts = keras_qlora.count_parameters(model)
            assert counts["trainable"] == trainable
            assert counts["trainable"] == counts["adapters"] + counts["memory"] + counts["prior"]
            assert (counts["prior"] > 0) == (arm in demo.PRIOR_ARMS)


def test_frozen_base_weights_bit_identical_after_training(demo, smoke):
    _, results, _ = smoke
    for entry in results["tasks"].values():
        for arm, arm_entry in entry["arms"].items():
            assert all(r["base_weights_unchanged"] for r in arm_entry["runs"]), arm


def test_base_weight_check_detects_a_change(demo, smoke):
    _, results, _ = smoke
    pretrained, config = results["pretrained"], results["config"]
    model, _, _ = demo.build_arm(demo.QLORA, pretrained, config)
    assert demo.base_weights_unchanged(model, pretrained)
    bias = demo.dense_layers(model)[1].bias
    bias.assign(bias + 1e-6)
    assert not demo.base_weights_unchanged(model, pretrained)


def test_routing_recorded_per_block_and_regime(demo, smoke):
    _, results, _ = smoke
    blocks = results["config"]["hidden_layers"] + 1
    for arm, entry in results["tasks"]["regimes"]["arms"].items():
        routing = entry["runs"][0]["routing"]
        if arm in demo.KERAS_LORA_ARMS:
            assert routing is None
            continue
        assert len(routing) == blocks, arm
        for block in routing:
            heat = np.asarray(block["mean_alpha_per_regime"])
            assert heat.shape == (demo.NUM_REGIMES, entry["runs"][0]["num_atoms"])
            present = heat.sum(axis=1) > 0
            np.testing.assert_allclose(heat[present].sum(axis=1), 1.0, atol=1e-5)
            assert 1.0 - 1e-6 <= block["effective_atoms"] <= heat.shape[1] + 1e-6
            assert -1e-6 <= block["regime_information"] <= math.log(demo.NUM_REGIMES) + 1e-6


def test_plots_written(demo, smoke):
    out, results, _ = smoke
    names = sorted(pathlib.Path(p).name for p in results["plots"])
    expected = sorted(f"{kind}_{task}.png" for kind in ("learning_curves", "routing") for task in demo.TASKS)
    assert names == expected
    for name in names:
        content = (out / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 10_000, name


def test_spikes_compare_with_the_lowest_earlier_window(demo):
    assert demo.spikes([1.0, 0.5, 0.9, 0.7, 0.76], factor=1.5) == (2, pytest.approx(1.8))
    assert demo.spikes([1.0, 0.8, 0.6], factor=1.5) == (0, pytest.approx(0.8))
    assert demo.spikes([1.0], factor=1.5) == (0, 1.0)


def test_window_loss_recovers_step_losses_from_running_means(demo):
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


def test_instructions_are_regime_texts_and_shuffled_ones_are_permuted(demo):
    config = {**demo.DEFAULT_CONFIG, **demo.SMOKE_CONFIG, "n_test": 256}
    data = demo.make_data(config)
    assert data["texts"] == [demo.regime_text(k) for k in range(demo.NUM_REGIMES)]
    np.testing.assert_array_equal(data["embeddings"][2], demo.embed_text(demo.regime_text(2), 32))
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, rtol=1e-6)
    assert np.linalg.matrix_rank(data["embeddings"]) == demo.NUM_REGIMES
    true = demo.arm_inputs(demo.QLORA_PRIOR, data, "test", seed=0)["instruction"]
    shuffled = demo.arm_inputs(demo.QLORA_SHUFFLED, data, "test", seed=0)["instruction"]
    np.testing.assert_array_equal(true, data["embeddings"][data["regime_test"]])
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, true))
    assert np.mean(np.all(shuffled == true, axis=1)) < 0.5
    assert "instruction" not in demo.arm_inputs(demo.QLORA, data, "test", seed=0)


def test_main_runs_a_selection_and_records_the_command(demo, tmp_path):
    results = demo.main(
        ["--smoke", "--tasks", "null", "--arms", demo.LORA, "--out", str(tmp_path), "--no-progress"]
    )
    assert list(results["tasks"]) == ["null"]
    assert list(results["tasks"]["null"]["arms"]) == [demo.LORA]
    assert results["command"].endswith(f"examples/regression_demo.py --smoke --tasks null --arms {demo.LORA} "
                                       f"--out {tmp_path} --no-progress")
    assert (tmp_path / "results.md").exists()


def test_notebook_is_generated_from_the_script():
    tool = load_script("tools/make_notebooks.py")
    for script, notebook in tool.notebooks().items():
        committed = (ROOT / notebook).read_text(encoding="utf-8")
        assert committed == tool.render(script, notebook), f"run python tools/make_notebooks.py ({notebook})"
        cells = json.loads(committed)["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "https://colab.research.google.com/assets/colab-badge.svg" in "".join(cells[0]["source"])
        assert "pip install" in code and "/work/" not in committed
        assert "def run(config" in code and "results = main()" in code
