"""Queryable LoRA against KerasHub's `enable_lora` and the base model: speed and memory.

Side by side in one process, steps interleaved (every round runs one step of
every arm, in rotating order), so machine noise hits every arm alike. The
figures are medians over the timed rounds, after warm-up rounds that also
compile. Ratios are the point; absolute times depend on the machine.

Arms, each a separately built model with the same base weights:
- `base`: no adapter (forward, generation; it has nothing to train);
- `enable_lora`: KerasHub's `backbone.enable_lora(rank)` on its default
  targets (query and value);
- `qlora`: `keras_qlora.enable(backbone, rank, num_atoms, top_k)`, same
  targets.

Figures: training step (`train_on_batch`), forward (`predict_on_batch`),
cached greedy generation (new tokens per second), and peak resident memory
of steady-state training steps (each arm in its own subprocess, peak mark
reset after the first step, so imports and compilation do not count).
Execution: TensorFlow with XLA, JAX with jit, PyTorch eager (`jit_compile`
follows the backend).

    KERAS_BACKEND=jax python benchmarks/bench.py                 # default grid
    KERAS_BACKEND=jax python benchmarks/bench.py --quick          # seconds
    KERAS_BACKEND=torch python benchmarks/bench.py --models smollm2 --batch 4 --seq 128
    python benchmarks/bench.py --sweep num_atoms --models llama256

Writes `benchmarks/results/bench_<backend>[_<tag>].json` and `.md`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_qlora  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = keras.backend.backend()
JIT = BACKEND != "torch"  # torch.compile is slower than eager on CPU
SIZES = {  # Llama-style backbones built from config
    "llama256": dict(hidden_dim=256, num_layers=4, num_query_heads=4, num_key_value_heads=2, intermediate_dim=768),
    "llama512": dict(hidden_dim=512, num_layers=4, num_query_heads=8, num_key_value_heads=4, intermediate_dim=1536),
    "llama1024": dict(hidden_dim=1024, num_layers=4, num_query_heads=16, num_key_value_heads=4, intermediate_dim=2816),
    "quick": dict(hidden_dim=64, num_layers=2, num_query_heads=2, num_key_value_heads=1, intermediate_dim=128),
}
VOCAB = 8192


def build(model_name, arm, rank, num_atoms, top_k, seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    if model_name == "smollm2":
        from keras_qlora.weights import smollm2_preset_dir

        lm = keras_hub.models.Llama3CausalLM.from_preset(smollm2_preset_dir(), preprocessor=None)
    else:
        backbone = keras_hub.models.LlamaBackbone(vocabulary_size=VOCAB, **SIZES[model_name])
        lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    if arm == "enable_lora":
        lm.backbone.enable_lora(rank)
    elif arm == "qlora":
        keras_qlora.enable(lm, rank=rank, num_atoms=num_atoms, top_k=top_k)
    elif arm != "base":
        raise ValueError(f"Unknown arm. Received: arm={arm!r}")
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
        jit_compile=JIT,
    )
    return lm


def batch(lm, batch_size, seq, seed=0):
    vocab = lm.backbone.vocabulary_size
    ids = np.random.default_rng(seed).integers(1, vocab, size=(batch_size, seq + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((batch_size, seq), bool)}
    return x, ids[:, 1:]


def code_version():
    """The git commit the figures were measured at (`+dirty` with local edits)."""
    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "keras_qlora", "benchmarks/*.py"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def trainable_count(lm):
    return int(sum(np.prod(w.shape) for w in lm.trainable_weights))


def interleaved(arms, fn, warmup, rounds):
    """Median seconds per call of `fn(model)` for every arm, rounds interleaved."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            fn(arms[name])
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fn(arms[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sync(out):
    # Block until the backend has finished (JAX dispatches asynchronously).
    keras.tree.map_structure(lambda t: keras.ops.convert_to_numpy(t) if hasattr(t, "shape") else t, out)
    return out


def peak_memory_mb(args, model_name, arm):
    """Peak resident memory of steady-state training steps of one arm, in MB.

    Each arm runs in its own process. After the model is built and one step
    has run (and compiled), the process's peak-RSS mark is reset
    (`/proc/self/clear_refs`, Linux), so the figure is the peak of three
    further steps, not of the library imports or the compilation.
    """
    code = (
        "import sys; sys.argv=['bench']; sys.path.insert(0, %r)\n"
        "import bench\n"
        "lm = bench.build(%r, %r, %d, %d, %d)\n"
        "x, y = bench.batch(lm, %d, %d)\n"
        "step = (lambda: lm.train_on_batch(x, y)) if lm.trainable_weights else (lambda: lm.predict_on_batch(x))\n"
        "bench._sync(step())\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "for _ in range(3):\n"
        "    bench._sync(step())\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print('VMHWM_KB', hwm, rss)\n"
    ) % (HERE, model_name, arm, args.rank, args.num_atoms, args.top_k, args.batch, args.seq)
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("VMHWM_KB")]
    if result.returncode != 0 or not lines:
        return None
    peak, before = (int(v) / 1024.0 for v in lines[-1].split()[1:3])
    return {"peak": peak, "growth": peak - before}


def run_model(args, model_name, num_atoms=None, rank=None, seq=None, top_k=None):
    rank = rank or args.rank
    num_atoms = num_atoms or args.num_atoms
    seq = seq or args.seq
    top_k = top_k or args.top_k
    arms = {arm: build(model_name, arm, rank, num_atoms, top_k) for arm in ("base", "enable_lora", "qlora")}
    x, y = batch(arms["base"], args.batch, seq)
    result = {
        "model": model_name, "rank": rank, "num_atoms": num_atoms, "top_k": top_k,
        "batch": args.batch, "seq": seq,
        "trainable": {a: trainable_count(m) for a, m in arms.items()},
    }
    trainers = {a: m for a, m in arms.items() if a != "base"}
    result["train_s"] = interleaved(trainers, lambda m: _sync(m.train_on_batch(x, y)), args.warmup, args.rounds)
    result["predict_s"] = interleaved(arms, lambda m: _sync(m.predict_on_batch(x)), args.warmup, args.rounds)
    if args.generate:
        prompt_len, new = max(seq // 2, 1), args.new_tokens
        ids = np.zeros((args.batch, prompt_len + new), "int32")
        ids[:, :prompt_len] = x["token_ids"][:, :prompt_len]
        mask = np.zeros_like(ids, bool)
        mask[:, :prompt_len] = True
        prompts = {"token_ids": ids, "padding_mask": mask}
        gen = interleaved(
            arms, lambda m: _sync(m.generate(prompts, stop_token_ids=None)), 1, max(args.rounds // 2, 2)
        )
        result["generate_tokens_per_s"] = {a: args.batch * new / s for a, s in gen.items()}
    if args.memory:
        result["peak_rss_mb"] = {a: peak_memory_mb(args, model_name, a) for a in arms}
    del arms
    return result


def ratios(result):
    out = {"train_vs_enable_lora": result["train_s"]["qlora"] / result["train_s"]["enable_lora"]}
    out["predict_vs_base"] = result["predict_s"]["qlora"] / result["predict_s"]["base"]
    out["predict_vs_enable_lora"] = result["predict_s"]["qlora"] / result["predict_s"]["enable_lora"]
    if "generate_tokens_per_s" in result:
        g = result["generate_tokens_per_s"]
        out["generate_vs_base"] = g["qlora"] / g["base"]
    if result.get("peak_rss_mb") and all(result["peak_rss_mb"].values()):
        m = result["peak_rss_mb"]
        out["memory_vs_enable_lora"] = m["qlora"]["peak"] / m["enable_lora"]["peak"]
    return out


def markdown(results, command):
    lines = [
        f"Backend: `{BACKEND}` ({'XLA/jit' if JIT else 'eager'}). Command: `{command}`",
        "",
        "| model | rank | M | k | batch×seq | train s/step (LoRA → QLoRA) | ×LoRA | predict ×base | generate tok/s (base → QLoRA) | ×base | peak RSS MB (+ growth in the steps), LoRA → QLoRA |",
        "|---|---:|---:|---:|---|---|---:|---:|---|---:|---|",
    ]
    for r in results:
        q = r["ratios"]
        gen = r.get("generate_tokens_per_s")
        mem = r.get("peak_rss_mb") or {}
        lines.append(
            f"| {r['model']} | {r['rank']} | {r['num_atoms']} | {r['top_k']} | {r['batch']}×{r['seq']} | "
            f"{r['train_s']['enable_lora']:.4f} → {r['train_s']['qlora']:.4f} | {q['train_vs_enable_lora']:.2f} | "
            f"{q['predict_vs_base']:.2f} | "
            + (f"{gen['base']:.1f} → {gen['qlora']:.1f} | {q['generate_vs_base']:.2f} | " if gen else "– | – | ")
            + (
                f"{mem['enable_lora']['peak']:.0f} (+{mem['enable_lora']['growth']:.0f}) → "
                f"{mem['qlora']['peak']:.0f} (+{mem['qlora']['growth']:.0f}) |"
                if mem.get("enable_lora") and mem.get("qlora") else "– |"
            )
        )
    return "\n".join(lines) + "\n"


SWEEPS = {
    "num_atoms": [8, 16, 32, 64, 128, 256],
    "rank": [4, 8, 16, 32, 64],
    "seq": [32, 64, 128, 256],
    "top_k": [1, 2, 4, 8],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama256,llama512,llama1024")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num_atoms", type=int, default=32)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--sweep", choices=["none", *SWEEPS], default="none")
    parser.add_argument("--no-generate", dest="generate", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch, args.seq, args.rounds, args.warmup, args.new_tokens = "quick", 2, 16, 3, 1, 4
    command = f"KERAS_BACKEND={BACKEND} python benchmarks/bench.py " + " ".join(sys.argv[1:])
    results = []
    for model_name in args.models.split(","):
        values = SWEEPS.get(args.sweep, [None])
        for value in values:
            kwargs = {} if value is None else {args.sweep: value}
            print(f"[{BACKEND}] {model_name} {kwargs or ''}", flush=True)
            result = run_model(args, model_name, **kwargs)
            result["ratios"] = ratios(result)
            print(json.dumps(result["ratios"]), flush=True)
            results.append(result)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{BACKEND}" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"backend": BACKEND, "jit": JIT, "command": command, "commit": code_version(), "keras": keras.__version__,
                   "results": results}, f, indent=1)
    table = markdown(results, command)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
