"""Seconds per `Llama3CausalLM` training step on SmolLM2-135M, for the current backend.

Arms, each a separately loaded copy of SmolLM2-135M-Instruct (real weights,
from `keras_qlora.weights.smollm2_preset_dir()`):

- `forward only (no adapter)`: `predict_on_batch` of the base model, for
  reference (nothing trains);
- `keras-hub enable_lora(8)`: `lm.backbone.enable_lora(8)` (query and value);
- `keras_qlora.enable(8, 32)`: `keras_qlora.enable(lm.backbone, rank=8,
  num_atoms=32)` (the same targets);
- `full fine-tune (no adapter)`: every weight trains (`--no-full` skips it).

Every round runs one step of every arm, in an order that rotates from round
to round, so machine noise hits every arm alike. The first `--warmup` rounds
also compile and are not timed; the table gives the median of the timed
rounds, and the fastest timed step (on a shared machine, the least disturbed
by other work). Execution follows the backend: XLA on TensorFlow (`jit_compile=True`),
jit on JAX, eager on PyTorch (torch.compile is far slower on CPU).

    KERAS_BACKEND=jax python benchmarks/smollm2_fit_step.py
    KERAS_BACKEND=torch python benchmarks/smollm2_fit_step.py --steps 4 --no-full

Prints a markdown table and writes
`benchmarks/results/smollm2_fit_step_<backend>.json`.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_qlora  # noqa: E402
from keras_qlora.weights import smollm2_preset_dir  # noqa: E402

BACKEND = keras.backend.backend()
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REFERENCE = "keras-hub enable_lora(8)"


def _load():
    return keras_hub.models.Llama3CausalLM.from_preset(smollm2_preset_dir(), preprocessor=None)


def _compile(lm):
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    return lm


def _build_arms(full):
    """`{name: (model, step)}`; `step(x, y)` runs one timed unit of work.

    The first arm only runs forward passes: it trains nothing.
    """
    arms = {}
    base = _compile(_load())
    arms["forward only (no adapter)"] = (base, lambda x, y: base.predict_on_batch(x))
    lora = _load()
    lora.backbone.enable_lora(8)
    arms[REFERENCE] = (_compile(lora), lora.train_on_batch)
    qlora = _load()
    keras_qlora.enable(qlora.backbone, rank=8, num_atoms=32)
    arms["keras_qlora.enable(8, 32)"] = (_compile(qlora), qlora.train_on_batch)
    if full:
        dense = _compile(_load())
        arms["full fine-tune (no adapter)"] = (dense, dense.train_on_batch)
    return arms


def _batch(batch, length, vocabulary_size, seed=0):
    # Ids past the 17 control tokens, so every one is ordinary text.
    ids = np.random.default_rng(seed).integers(17, vocabulary_size, (batch, length + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((batch, length), dtype="bool")}
    return x, ids[:, 1:]


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (they compile)")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds")
    parser.add_argument("--no-full", dest="full", action="store_false", help="skip the full fine-tune arm")
    args = parser.parse_args()

    started, load_at_start = time.time(), os.getloadavg()
    arms = _build_arms(args.full)
    load_s = time.time() - started
    names = list(arms)
    vocabulary_size = arms[REFERENCE][0].backbone.vocabulary_size
    x, y = _batch(args.batch, args.length, vocabulary_size)
    times = {name: [] for name in names}
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            step = arms[name][1]
            tick = time.perf_counter()
            step(x, y)  # returns numpy values, so the work has finished
            times[name].append(time.perf_counter() - tick)
        spent = ", ".join(f"{name}: {times[name][-1]:.2f} s" for name in names)
        print(f"round {round_index + 1}/{args.warmup + args.steps}: {spent}", file=sys.stderr, flush=True)

    timed = {name: times[name][args.warmup:] for name in names}
    medians = {name: statistics.median(timed[name]) for name in names}
    rows = [
        {
            "arm": name,
            "median_s_per_step": medians[name],
            "ratio_to_enable_lora": medians[name] / medians[REFERENCE],
            "min_s_per_step": min(timed[name]),
            "min_ratio_to_enable_lora": min(timed[name]) / min(timed[REFERENCE]),
            "trainable_params": 0 if name == names[0] else _trainable(arms[name][0]),
            "first_step_s": times[name][0],
            "timed_s": timed[name],
        }
        for name in names
    ]
    command = f"KERAS_BACKEND={BACKEND} python " + shlex.join(sys.argv)
    print(f"\n`{command}`: batch {args.batch} x length {args.length}, {args.steps} timed rounds "
          f"after {args.warmup} warm-up rounds\n")
    print("| backend | arm | median s/step | ratio to enable_lora | min s/step | ratio (min) | trainable params |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {BACKEND} | {row['arm']} | {row['median_s_per_step']:.3f} | {row['ratio_to_enable_lora']:.2f} | "
              f"{row['min_s_per_step']:.3f} | {row['min_ratio_to_enable_lora']:.2f} | {row['trainable_params']:,} |")

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"smollm2_fit_step_{BACKEND}.json")
    record = {
        "command": command,
        "backend": BACKEND,
        "versions": {"keras": keras.__version__, "keras_hub": keras_hub.__version__,
                     "keras_qlora": keras_qlora.__version__, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        "batch": args.batch,
        "length": args.length,
        "warmup_rounds": args.warmup,
        "timed_rounds": args.steps,
        "load_s": load_s,
        "total_s": time.time() - started,
        "arms": rows,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
