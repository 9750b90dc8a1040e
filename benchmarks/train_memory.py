"""Training-step memory of Queryable LoRA against KerasHub's `enable_lora`, in tensors.

Process RSS on a small model follows runtime overhead (compiled programs,
allocator arenas, thread pools), not the training step's tensors; see
`docs/results/benchmarks.md`. This script measures the tensors themselves:

- JAX: XLA's own buffer assignment for the compiled `train_step`
  (`jax.jit(...).lower(...).compile().memory_analysis()`): the arguments
  (weights, optimizer state, batch), the outputs, and the temporaries (the
  activations kept for the backward pass, gradients, intermediates). The
  peak is `arguments + outputs + temporaries - aliased` (donated buffers
  that the outputs reuse), an upper bound on what the step holds at once.
- PyTorch (eager): every tensor autograd saves for the backward pass during
  one forward pass and loss (`torch.autograd.graph.saved_tensors_hooks`),
  counted once per storage and leaving out the model's own variables. Add
  the trainable weights' gradients and Adam's two moments (three copies of
  the trainable weights), and the frozen weights, to get the step's tensors.
- TensorFlow: no public per-program memory figure for XLA on CPU; use the
  JAX figure (the same Keras graph through XLA) or `bench.py`'s RSS.

Arms: `enable_lora` (`backbone.enable_lora(rank)`) and `qlora`
(`keras_qlora.enable(lm, rank, num_atoms, top_k)`), same targets (query and
value), same batch.

    KERAS_BACKEND=jax python benchmarks/train_memory.py --models llama256,smollm2
    KERAS_BACKEND=torch python benchmarks/train_memory.py --models llama256,smollm2

Writes `benchmarks/results/train_memory_<backend>.json` and prints a table.
"""

import argparse
import json
import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  (builds the models exactly as the speed benchmark does)
import keras  # noqa: E402
import numpy as np  # noqa: E402

MB = 1024.0 * 1024.0
ARMS = ("enable_lora", "qlora")


def _jax_memory(lm, x, y):
    import jax

    lm.train_on_batch(x, y)  # builds the model, the optimizer and the metrics
    # The state tuple Keras's JAX trainer passes to its jitted train step
    # (a private helper; this is a benchmark, not library code).
    state = lm._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
        purge_model_variables=False,
    )
    compiled = jax.jit(lm.train_step, donate_argnums=0).lower(state, (x, y, None)).compile()
    analysis = compiled.memory_analysis()
    figures = {
        "arguments_mb": analysis.argument_size_in_bytes / MB,
        "outputs_mb": analysis.output_size_in_bytes / MB,
        "temporaries_mb": analysis.temp_size_in_bytes / MB,
        "aliased_mb": analysis.alias_size_in_bytes / MB,
    }
    figures["peak_mb"] = (
        figures["arguments_mb"] + figures["outputs_mb"] + figures["temporaries_mb"] - figures["aliased_mb"]
    )
    return figures


def _bytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize for v in variables)


def _torch_memory(lm, x, y):
    import torch

    lm.train_on_batch(x, y)  # builds everything, as in training
    own = {v.value.untyped_storage().data_ptr() for v in lm.weights}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(y, lm(x, training=True))
    del loss
    trainable = _bytes(lm.trainable_weights) / MB
    frozen = _bytes(lm.non_trainable_weights) / MB
    figures = {
        "saved_for_backward_mb": sum(saved.values()) / MB,
        "trainable_with_grad_and_adam_mb": 4 * trainable,
        "frozen_mb": frozen,
    }
    figures["peak_mb"] = sum(figures.values())
    return figures


def measure(model_name, arm, args):
    lm = bench.build(model_name, arm, args.rank, args.num_atoms, args.top_k)
    x, y = bench.batch(lm, args.batch, args.seq)
    backend = keras.backend.backend()
    if backend == "jax":
        figures = _jax_memory(lm, x, y)
    elif backend == "torch":
        figures = _torch_memory(lm, x, y)
    else:
        raise SystemExit(
            "TensorFlow has no public per-program memory figure for XLA on CPU; "
            "run this script with KERAS_BACKEND=jax or torch."
        )
    figures["trainable_params"] = bench.trainable_count(lm)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama256,llama512,smollm2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num_atoms", type=int, default=32)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(bench.HERE, "results"))
    args = parser.parse_args()
    backend = keras.backend.backend()
    command = f"KERAS_BACKEND={backend} python benchmarks/train_memory.py " + shlex.join(sys.argv[1:])
    results = []
    for model_name in args.models.split(","):
        row = {"model": model_name, "rank": args.rank, "num_atoms": args.num_atoms, "top_k": args.top_k,
               "batch": args.batch, "seq": args.seq}
        for arm in ARMS:
            row[arm] = measure(model_name, arm, args)
            keras.backend.clear_session()
        row["peak_vs_enable_lora"] = row["qlora"]["peak_mb"] / row["enable_lora"]["peak_mb"]
        results.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"train_memory_{backend}.json"), "w") as f:
        json.dump({"backend": backend, "command": command, "commit": bench.code_version(), "keras": keras.version(), "results": results}, f, indent=1)
    keys = [k for k in results[0]["qlora"] if k.endswith("_mb")]
    print(f"\n{command}\n")
    print("| model | " + " | ".join(f"{k[:-3]} MB, LoRA → QLoRA" for k in keys) + " | peak ×LoRA |")
    print("|---|" + "---|" * len(keys) + "---:|")
    for r in results:
        cells = [f"{r['enable_lora'][k]:.1f} → {r['qlora'][k]:.1f}" for k in keys]
        print(f"| {r['model']} | " + " | ".join(cells) + f" | {r['peak_vs_enable_lora']:.3f} |")


if __name__ == "__main__":
    main()
