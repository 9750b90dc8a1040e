"""What freezing the routing costs: the regression study's Queryable LoRA arms, exported.

    KERAS_BACKEND=jax python benchmarks/export_cost.py            # the full study's settings, 5 seeds
    KERAS_BACKEND=jax python benchmarks/export_cost.py --smoke    # seconds

`keras_qlora.merge_adapter` serves a routed adapter at the base model's
cost by freezing the routing: each layer's update becomes the static
`s A (sum_m alpha_m U_m) B`, added to its kernel. This script measures the
accuracy that costs on `examples/regression_demo.py`. Every Queryable LoRA
arm is trained as in the full study (same data, seeds, epochs and the peak
learning rate the full study's sweep chose), then its test MSE is measured
three ways:

* routed: the adapted model itself;
* frozen, one routing: each layer's routing weights averaged over the
  training inputs (`keras_qlora.calibrate_routing`), folded into the
  kernels of a plain copy of the base MLP;
* frozen per instruction (prior arms): one folded MLP per regime, its
  routing averaged over the training inputs of that regime under that
  regime's instruction; each test point goes to the MLP of its
  instruction. This is the "one export per instruction" deployment.

Writes `benchmarks/results/export_cost_<backend>.{json,md}`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import keras
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import keras_qlora  # noqa: E402
from keras_qlora.export import kernel_update  # noqa: E402

spec = importlib.util.spec_from_file_location("regression_demo", ROOT / "examples" / "regression_demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

# The peak learning rates the full study's sweep chose (docs/results/regression.md, JAX).
CHOSEN_LR = {
    "regimes": {demo.QLORA_NONE: 1e-2, demo.QLORA: 1e-2, demo.QLORA_PRIOR: 3e-3, demo.QLORA_SHUFFLED: 1e-2},
    "null": {demo.QLORA_NONE: 1e-3, demo.QLORA: 1e-3, demo.QLORA_PRIOR: 3e-3, demo.QLORA_SHUFFLED: 3e-3},
}


def folded(model, pretrained, routing):
    """A plain copy of the base MLP with `s A R B` added to each kernel;
    `routing` maps each adapted layer to its frozen weights."""
    plain = keras.models.clone_model(pretrained)
    plain.set_weights(pretrained.get_weights())
    for adapted, target in zip(demo.dense_layers(model), demo.dense_layers(plain)):
        update = keras.ops.convert_to_numpy(kernel_update(adapted, routing[adapted]))
        target.kernel.assign(keras.ops.convert_to_numpy(target.kernel) + update)
    return plain


def mse(pred, y):
    return float(np.mean((np.asarray(pred).reshape(-1) - y.reshape(-1)) ** 2))


def measure(arm, task, data, pretrained, config, rank, seed):
    keras.utils.set_random_seed(1000 + seed)  # as run_arm does
    model, memory, _ = demo.build_arm(arm, pretrained, config, rank)
    demo.train(model, demo.arm_inputs(arm, data, "train", seed), data[f"y_{task}_train"], config,
               CHOSEN_LR[task][arm])
    y_test = data[f"y_{task}_test"]
    test_inputs = demo.arm_inputs(arm, data, "test", seed)
    routed, _ = demo.predict(model, test_inputs)
    train_inputs = demo.arm_inputs(arm, data, "train", seed)
    one = folded(model, pretrained, keras_qlora.calibrate_routing(model, train_inputs))
    record = {
        "seed": seed,
        "routed": mse(routed, y_test),
        "frozen_one_routing": mse(one.predict({"x": data["x_test"]}, verbose=0, batch_size=4096), y_test),
    }
    if arm in demo.PRIOR_ARMS:
        pred = np.zeros(len(y_test))
        for k in range(demo.NUM_REGIMES):
            rows = data["regime_train"] == k
            # The instruction of regime k on its own training inputs; with the
            # shuffled control, the rows whose (permuted) instruction is k's.
            if arm == demo.QLORA_SHUFFLED:
                rows = np.all(train_inputs["instruction"] == data["embeddings"][k], axis=1)
            subset = {key: value[rows] for key, value in train_inputs.items()}
            export = folded(model, pretrained, keras_qlora.calibrate_routing(model, subset))
            test_rows = np.all(test_inputs["instruction"] == data["embeddings"][k], axis=1)
            pred[test_rows] = export.predict({"x": data["x_test"][test_rows]}, verbose=0, batch_size=4096).reshape(-1)
        record["frozen_per_instruction"] = mse(pred, y_test)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a run of seconds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    config = {**demo.DEFAULT_CONFIG, **demo.FULL_CONFIG, "learning_rates": [None]}
    seeds = args.seeds
    if args.smoke:
        config.update(demo.SMOKE_CONFIG)
        seeds = 1
    start = time.perf_counter()
    data = demo.make_data(config)
    pretrained = demo.pretrain(data, config)
    ranks, _ = demo.match_ranks(pretrained, config)
    results = {"backend": keras.backend.backend(), "command": " ".join(
        [f"KERAS_BACKEND={keras.backend.backend()}", "python", "benchmarks/export_cost.py", *(argv or sys.argv[1:])]),
        "config": {k: v for k, v in config.items() if k != "learning_rates"}, "learning_rates": CHOSEN_LR,
        "tasks": {}}
    for task in demo.TASKS:
        results["tasks"][task] = {}
        for arm in demo.QLORA_ARMS:
            runs = [measure(arm, task, data, pretrained, config, ranks[arm], seed) for seed in range(seeds)]
            results["tasks"][task][arm] = runs
            print(task, arm, {k: round(float(np.mean([r[k] for r in runs])), 4) for k in runs[0] if k != "seed"},
                  flush=True)
    results["wall_time_s"] = time.perf_counter() - start
    lines = [
        "# Exporting Queryable LoRA: what freezing the routing costs (regression study)",
        "",
        f"Command: `{results['command']}` ({results['wall_time_s']:.0f} s). Test MSE on noise-free "
        f"targets, mean ± std over {seeds} seeds; the arms trained as in the full study.",
        "",
        "| task | arm | routed | frozen, one routing | frozen, one per instruction |",
        "|---|---|---:|---:|---:|",
    ]
    for task, arms in results["tasks"].items():
        for arm, runs in arms.items():
            cells = []
            for key in ("routed", "frozen_one_routing", "frozen_per_instruction"):
                values = [r[key] for r in runs if key in r]
                cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"
                             if values else "-")
            lines.append(f"| {task} | {arm} | " + " | ".join(cells) + " |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    (out / f"export_cost_{results['backend']}{suffix}.json").write_text(json.dumps(results, indent=1))
    (out / f"export_cost_{results['backend']}{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
