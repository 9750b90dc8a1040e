# %% [markdown]
# # Queryable LoRA on noisy, regime-dependent non-linear regression
#
# A small Keras MLP is pretrained on a base function `f0`. With every base
# weight frozen, it is then adapted to a new target, `f0(x) + c(x) + noise`,
# by eight parameter-efficient arms at matched trainable parameters:
#
# | arm | what it is |
# |---|---|
# | LoRA (Keras) | Keras's own `Dense.enable_lora(rank)`, scale `alpha / r = 1` |
# | rsLoRA (Keras) | the same layers with `lora_alpha = r * sqrt(r)`, so Keras's scale `lora_alpha / r` is rsLoRA's `alpha / sqrt(r)` with `alpha = r` |
# | LoRA + instruction input | Keras's LoRA, and the instruction embedding added to the first hidden layer's output through a trainable rank-2 map (zero at the start): plain LoRA told the regime, the fair baseline for the prior arms |
# | Static mixer (M=1) | `keras_qlora` with one atom: a static LoRA with an `r x r` mixer, no routing |
# | QLoRA, no summary | Queryable LoRA with `summary="none"` (routing per block, no memory of earlier blocks) |
# | QLoRA | Queryable LoRA with its default attention summary over depth |
# | QLoRA + prior | QLoRA with an `InstructionPrior`; each example carries the text of its regime |
# | QLoRA + shuffled prior | the same, with the instructions permuted across examples (a control: the prior carries no information) |
#
# **Two tasks.** In `regimes`, the input space is cut into four regimes (the
# sign pattern of two fixed projections of `x`) and each regime needs its own
# low-rank, tanh-shaped correction. In `null` (the control), the correction
# is one function for every input (a single correction of the same form), so
# there is nothing to route: Queryable LoRA should tie LoRA there, not win.
# Training and validation targets carry Gaussian noise; test targets are
# noise-free, so the test MSE measures how well the clean function was
# learned.
#
# **Instructions.** Each regime has a one-line text ("regime 2: the first
# projection is positive and the second is negative"). Texts are embedded
# deterministically, with no download: counts of hashed character trigrams
# (CRC-32 into 512 buckets), times a fixed Gaussian projection (seeded) to 32
# dimensions, normalized to unit length. In the `null` task the same texts
# are given; they are true but useless there.
#
# **Parameters are matched from above.** The Queryable LoRA arms share one
# rank and atom count; the largest of them (the prior arms) sets the budget.
# LoRA, rsLoRA, LoRA + instruction input and the static mixer each get the smallest rank whose
# trainable count, counted from the built model, reaches that budget. So no
# baseline has fewer trainable parameters than any Queryable LoRA arm.
#
# **Same recipe for every arm**: Adam, cosine decay to 10% of the peak
# learning rate, the same epochs, batch size, data and seeds. With
# `--full`, the peak learning rate is chosen per arm and task from a small
# grid by validation MSE (noisy held-out targets; the test set is never used
# for a choice). **Stability**: the training loss is averaged over windows of
# 16 steps; a *spike* is a window whose loss exceeds 1.5 times the lowest
# window loss seen before it. The table counts spikes over all seeds and the
# spread of test MSE across seeds.

# %%
"""Queryable LoRA vs LoRA on noisy, regime-dependent non-linear regression.

    KERAS_BACKEND=jax python examples/regression_demo.py          # the demo (`make demo`)
    KERAS_BACKEND=jax python examples/regression_demo.py --full   # the complete study
    KERAS_BACKEND=jax python examples/regression_demo.py --smoke  # seconds, for tests

Writes `results.json`, `results.md` and plots to `--out` (default
`outputs/regression`) and prints the tables. The backend comes from
`KERAS_BACKEND`. `tools/make_notebooks.py` builds
`examples/regression_demo.ipynb` from this file.
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
import zlib

import keras
import numpy as np
from tqdm.auto import tqdm

try:
    import keras_qlora
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import keras_qlora

# %% [markdown]
# ## Configuration
#
# `DEFAULT_CONFIG` is what `make demo` runs (a few minutes on two CPU cores
# with JAX). `FULL_CONFIG` is the complete study; `SMOKE_CONFIG` is a run of
# seconds for the tests.

# %%
LORA = "LoRA (Keras)"
RSLORA = "rsLoRA (Keras)"
STATIC = "Static mixer (M=1)"
QLORA_NONE = "QLoRA, no summary"
QLORA = "QLoRA"
QLORA_PRIOR = "QLoRA + prior"
QLORA_SHUFFLED = "QLoRA + shuffled prior"
LORA_INSTRUCTED = "LoRA + instruction input"
ARMS = (LORA, RSLORA, LORA_INSTRUCTED, STATIC, QLORA_NONE, QLORA, QLORA_PRIOR, QLORA_SHUFFLED)
KERAS_LORA_ARMS = (LORA, RSLORA, LORA_INSTRUCTED)
QLORA_ARMS = (QLORA_NONE, QLORA, QLORA_PRIOR, QLORA_SHUFFLED)
PRIOR_ARMS = (QLORA_PRIOR, QLORA_SHUFFLED)
INSTRUCTED_ARMS = (LORA_INSTRUCTED, *PRIOR_ARMS)  # the arms whose inputs carry the instruction
TASKS = ("regimes", "null")
NUM_REGIMES = 4  # sign patterns of two fixed projections of x

DEFAULT_CONFIG = {
    # data
    "data_seed": 0,
    "input_dim": 12,
    "n_pretrain": 16384,
    "n_train": 4096,
    "n_val": 1024,
    "n_test": 4096,
    "correction_scale": 0.7,  # std of the correction c(x); f0 has std 1
    "noise_std": 0.3,  # on training and validation targets only
    "embedding_dim": 32,
    # the pretrained base model
    "hidden_units": 64,
    "hidden_layers": 2,
    "pretrain_epochs": 30,
    # adaptation, the same for every arm
    "tasks": list(TASKS),
    "arms": list(ARMS),
    "seeds": 2,
    "epochs": 20,
    "batch_size": 64,
    "learning_rates": [3e-3],  # more than one: a sweep per arm and task
    "sweep_seeds": 1,
    "final_lr_fraction": 0.1,  # cosine decay to this fraction of the peak
    # the Queryable LoRA arms
    "qlora_rank": 4,
    "num_atoms": 8,
    "top_k": 2,
    # The library's defaults are 32; 16 keeps the memory from dwarfing the
    # adapters of this small MLP (it counts as trainable parameters).
    "key_dim": 16,
    "summary_dim": 16,
    "prior_strength": 1.0,
    # LoRA + instruction input: the rank of its instruction -> hidden map
    "instruction_rank": 2,
    # stability
    "spike_window": 16,
    "spike_factor": 1.5,
    # mechanics
    "run_eagerly": False,
    "plots": True,
    "out": "outputs/regression",
}

FULL_CONFIG = {"seeds": 5, "epochs": 30, "learning_rates": [1e-3, 3e-3, 1e-2]}

SMOKE_CONFIG = {
    # Evaluation batches the size of training batches: fewer shapes to compile.
    "n_pretrain": 64,
    "n_train": 64,
    "n_val": 32,
    "n_test": 32,
    "hidden_units": 16,
    # The base stays at its random initialization: on JAX, every shape
    # trained costs a compile, and the adaptation runs `fit` the same way.
    "pretrain_epochs": 0,
    "seeds": 1,
    "epochs": 1,
    "batch_size": 32,
    "spike_window": 2,
    # Compiling 14 tiny models costs more than running them eagerly.
    "run_eagerly": True,
}


# %% [markdown]
# ## Data and instructions

# %%
def regime_text(k):
    """The instruction text of regime `k` (bit 1: first projection, bit 0: second)."""
    sign = lambda bit: "positive" if bit else "negative"  # noqa: E731
    return f"regime {k}: the first projection is {sign(k >> 1)} and the second is {sign(k & 1)}"


def embed_text(text, dim, buckets=512, n=3, seed=20240):
    """A deterministic text embedding: hashed character n-gram counts, projected.

    Counts every character `n`-gram of the lower-cased text (padded with a
    space) into `buckets` bins by CRC-32 (stable across runs and machines,
    unlike Python's `hash`), multiplies by a fixed Gaussian matrix drawn from
    `seed`, and normalizes to unit length.
    """
    padded = f" {text.lower()} "
    counts = np.zeros(buckets)
    for i in range(len(padded) - n + 1):
        counts[zlib.crc32(padded[i : i + n].encode("utf-8")) % buckets] += 1
    projection = np.random.default_rng(seed).normal(size=(buckets, dim))
    vector = counts @ projection
    return (vector / np.linalg.norm(vector)).astype("float32")


def _tanh_mlp(rng, sizes):
    """A fixed random tanh MLP as a NumPy function of `(n, sizes[0])` inputs."""
    weights = [rng.normal(size=(a, b)) / math.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    biases = [0.3 * rng.normal(size=(b,)) for b in sizes[1:]]

    def f(x):
        h = x
        for i, (w, b) in enumerate(zip(weights, biases)):
            h = h @ w + b
            if i < len(weights) - 1:
                h = np.tanh(2.0 * h)
        return h[:, 0]

    return f


def _ridge_corrections(rng, d, count):
    """`count` corrections `x -> sum_j g_j tanh(2 x.u_j) + 0.5 x.l`, rank 2 each."""
    directions = rng.normal(size=(count, d, 2)) / math.sqrt(d)
    gains = rng.normal(size=(count, 2))
    linear = rng.normal(size=(count, d)) / math.sqrt(d)

    def c(x, k):
        hidden = np.tanh(2.0 * np.einsum("nd,ndr->nr", x, directions[k]))
        return np.einsum("nr,nr->n", hidden, gains[k]) + 0.5 * np.einsum("nd,nd->n", x, linear[k])

    return c


def make_data(config):
    """The pretraining set and, for each task, the adaptation splits.

    Returns a dict: `x_pre`, `y_pre` (noise-free `f0`); `texts` and
    `embeddings` (one row per regime); and for each split in `train`, `val`,
    `test`: `x_<split>`, `regime_<split>`, and per task `y_<task>_<split>`
    (noisy for train and val, noise-free for test). All arrays are float32
    except the integer regimes. Both tasks share inputs and noise draws.
    """
    rng = np.random.default_rng(config["data_seed"])
    d = config["input_dim"]
    f0_raw = _tanh_mlp(rng, [d, 32, 32, 1])
    reference = rng.normal(size=(16384, d))
    mu, sigma = f0_raw(reference).mean(), f0_raw(reference).std()
    projections = rng.normal(size=(d, 2))
    per_regime = _ridge_corrections(rng, d, NUM_REGIMES)
    single = _ridge_corrections(rng, d, 1)

    def regime(x):
        signs = (x @ projections > 0).astype(np.int64)
        return signs[:, 0] * 2 + signs[:, 1]

    raw = {
        "regimes": lambda x: per_regime(x, regime(x)),
        "null": lambda x: single(x, np.zeros(len(x), dtype=np.int64)),
    }
    scale = {task: config["correction_scale"] / c(reference).std() for task, c in raw.items()}
    f32 = lambda a: np.asarray(a, dtype="float32")  # noqa: E731
    x_pre = rng.normal(size=(config["n_pretrain"], d))
    data = {
        "x_pre": f32(x_pre),
        "y_pre": f32((f0_raw(x_pre) - mu) / sigma)[:, None],
        "texts": [regime_text(k) for k in range(NUM_REGIMES)],
    }
    data["embeddings"] = np.stack([embed_text(t, config["embedding_dim"]) for t in data["texts"]])
    for split in ("train", "val", "test"):
        n = config[f"n_{split}"]
        x = rng.normal(size=(n, d))
        noise = 0.0 if split == "test" else config["noise_std"] * rng.normal(size=(n,))
        data[f"x_{split}"] = f32(x)
        data[f"regime_{split}"] = regime(x)
        for task, c in raw.items():
            clean = (f0_raw(x) - mu) / sigma + scale[task] * c(x)
            data[f"y_{task}_{split}"] = f32(clean + noise)[:, None]
    return data


# %% [markdown]
# ## The base model and the arms

# %%
def build_mlp(config):
    inputs = {"x": keras.Input((config["input_dim"],), name="x")}
    h = inputs["x"]
    for i in range(config["hidden_layers"]):
        h = keras.layers.Dense(config["hidden_units"], activation="gelu", name=f"dense_{i}")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    return keras.Model(inputs, outputs, name="mlp")


def dense_layers(model):
    """The Dense layers of `model` (or of the model an `InstructedModel` wraps), in depth order."""
    model = getattr(model, "model", model)
    return [
        layer for layer in model.layers
        if isinstance(layer, keras.layers.Dense) and not layer.name.startswith("instruction_")
    ]


def pretrain(data, config):
    """Trains the base MLP on `f0`; returns it."""
    keras.utils.set_random_seed(config["data_seed"])
    model = build_mlp(config)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", run_eagerly=config["run_eagerly"])
    model.fit(
        {"x": data["x_pre"]},
        data["y_pre"],
        epochs=config["pretrain_epochs"],
        batch_size=config["batch_size"],
        verbose=0,
    )
    return model


def num_params(weights):
    """Total size of `weights`, each variable once."""
    return int(sum(math.prod(w.shape) for w in {id(w): w for w in weights}.values()))


def make_memory(arm, config, rank, num_blocks):
    """The `AtomMemory` (with its prior, if any) of a `keras_qlora` arm."""
    prior = None
    if arm in PRIOR_ARMS:
        prior = keras_qlora.InstructionPrior(
            embedding_dim=config["embedding_dim"], prior_strength=config["prior_strength"]
        )
    static = arm == STATIC
    return keras_qlora.AtomMemory(
        num_atoms=1 if static else config["num_atoms"],
        rank=rank,
        top_k=1 if static else config["top_k"],
        key_dim=config["key_dim"],
        summary_dim=config["summary_dim"],
        num_blocks=num_blocks,
        # One atom routes nowhere: no summary weights to carry.
        summary="none" if arm in (STATIC, QLORA_NONE) else "attention",
        prior=prior,
        name="atom_memory",
    )


def build_arm(arm, pretrained, config, rank=None):
    """A copy of `pretrained`, base frozen, with the adapters of `arm`.

    Args:
        arm: one of `ARMS`.
        pretrained: the pretrained base model.
        config: the run's configuration.
        rank: the adapter rank; `None` takes `config["qlora_rank"]`
            (LoRA, rsLoRA and the static mixer get theirs from `match_ranks`).

    Returns:
        `(model, memory, info)`: `memory` is the arm's `AtomMemory` (`None`
        for Keras's LoRA); `info` holds `rank`, `num_atoms`, `top_k`,
        `trainable_params` and, for `keras_qlora` arms, `param_breakdown`.
    """
    model = keras.models.clone_model(pretrained)
    model.set_weights(pretrained.get_weights())
    layers = dense_layers(model)
    rank = rank or config["qlora_rank"]
    if arm in KERAS_LORA_ARMS:
        for layer in layers:
            # Keras's scale is lora_alpha / rank: alpha = r * sqrt(r) gives
            # rsLoRA's alpha' / sqrt(r) with alpha' = r.
            layer.enable_lora(rank, lora_alpha=rank * math.sqrt(rank) if arm == RSLORA else rank)
            layer.bias.trainable = False  # enable_lora leaves it trainable
        if arm == LORA_INSTRUCTED:
            # The same layers, called again in a graph with a second input:
            # h_1 = dense_0(x) + (e W_down) W_up, with W_up zero at the start.
            x = keras.Input((config["input_dim"],), name="x")
            e = keras.Input((config["embedding_dim"],), name="instruction")
            shift = keras.layers.Dense(config["instruction_rank"], use_bias=False, name="instruction_down")(e)
            shift = keras.layers.Dense(
                config["hidden_units"], use_bias=False, kernel_initializer="zeros", name="instruction_up"
            )(shift)
            h = keras.layers.Add(name="instructed")([layers[0](x), shift])
            for layer in layers[1:]:
                h = layer(h)
            model = keras.Model({"x": x, "instruction": e}, h, name="mlp_instructed")
        info = {"rank": rank, "num_atoms": None, "top_k": None}
        return model, None, {**info, "trainable_params": num_params(model.trainable_weights)}
    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}; expected one of {ARMS}.")
    memory = make_memory(arm, config, rank, len(layers))
    for block, layer in enumerate(layers):
        keras_qlora.adapt(layer, memory, block=block)
    if memory.prior is not None:
        model = keras_qlora.InstructedModel(model)
    counts = keras_qlora.count_parameters(model)
    info = {
        "rank": rank,
        "num_atoms": memory.num_atoms,
        "top_k": memory.top_k,
        "trainable_params": int(counts["trainable"]),
        "param_breakdown": {k: int(v) for k, v in counts.items()},
    }
    return model, memory, info


def expected_params(arm, pretrained, config, rank):
    """Trainable parameters of `arm` at `rank`, by the formula of METHOD.md section 5.

    Adapters: `rank (d_in + d_out)` per Dense layer, for Keras's LoRA and
    for ours alike. Memory: `M r² + M d_k + (r + d_s) d_k + blocks d_k + d_s`,
    plus `M d_s + d_s` with the attention summary. Prior: `d_e M`. Computed
    without building anything (on JAX every new shape costs a compile);
    `run_arm` records the count of the built model, and the tests check that
    the two agree.
    """
    layers = dense_layers(pretrained)
    adapters = rank * sum(layer.kernel.shape[0] + layer.kernel.shape[1] for layer in layers)
    if arm in (LORA, RSLORA):
        return adapters
    if arm == LORA_INSTRUCTED:
        return adapters + config["instruction_rank"] * (config["embedding_dim"] + config["hidden_units"])
    atoms = 1 if arm == STATIC else config["num_atoms"]
    key, summary = config["key_dim"], config["summary_dim"]
    memory = atoms * rank**2 + atoms * key + (rank + summary) * key + len(layers) * key + summary
    if arm not in (STATIC, QLORA_NONE):
        memory += atoms * summary + summary
    prior = config["embedding_dim"] * atoms if arm in PRIOR_ARMS else 0
    return adapters + memory + prior


def match_ranks(pretrained, config):
    """The rank of every arm, matched from above (see the top of this file).

    Returns `(ranks, budget)`: arm -> rank, and the trainable count of the
    largest Queryable LoRA arm, which every other arm reaches or exceeds
    with the smallest rank that does.
    """
    budget = max(expected_params(arm, pretrained, config, config["qlora_rank"]) for arm in QLORA_ARMS)
    ranks = {arm: config["qlora_rank"] for arm in QLORA_ARMS}
    for arm in (*KERAS_LORA_ARMS, STATIC):
        # The count grows with the rank: bisect between 1 and a rank whose
        # adapters alone reach the budget.
        low, high = 1, math.ceil(budget / expected_params(LORA, pretrained, config, 1))
        while low < high:
            middle = (low + high) // 2
            if expected_params(arm, pretrained, config, middle) >= budget:
                high = middle
            else:
                low = middle + 1
        ranks[arm] = low
    return ranks, budget


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


def spikes(losses, factor):
    """`(count, worst ratio)`: windows above `factor` x the lowest earlier one."""
    losses = np.asarray(losses)
    if losses.size < 2:
        return 0, 1.0
    ratios = losses[1:] / np.minimum.accumulate(losses)[:-1]
    return int(np.sum(ratios > factor)), float(ratios.max())


def arm_inputs(arm, data, split, seed):
    """The model inputs of `split` for `arm`: `x`, plus instructions for the instructed arms.

    The instruction of an example is the embedding of its regime's text; the
    shuffled control permutes those rows across the examples of the split.
    """
    inputs = {"x": data[f"x_{split}"]}
    if arm in INSTRUCTED_ARMS:
        regimes = data[f"regime_{split}"]
        if arm == QLORA_SHUFFLED:
            regimes = np.random.default_rng([seed, len(regimes)]).permutation(regimes)
        inputs["instruction"] = data["embeddings"][regimes]
    return inputs


def train(model, inputs, targets, config, learning_rate):
    """Fits `model` with the shared recipe; returns the window losses."""
    steps = math.ceil(len(targets) / config["batch_size"]) * config["epochs"]
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=steps, alpha=config["final_lr_fraction"]
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse", run_eagerly=config["run_eagerly"])
    recorder = WindowLoss(len(targets), config["batch_size"], config["spike_window"])
    model.fit(
        inputs,
        targets,
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        verbose=0,
        callbacks=[recorder],
    )
    return recorder.losses


def predict(model, inputs, memory=None):
    """One eager call: predictions `(n,)` and, with `memory`, the routing.

    Returns `(predictions, alphas)`; `alphas` is a list of `(n, num_atoms)`
    arrays, one per block in depth order (`None` without `memory`).
    """
    tensors = {k: keras.ops.convert_to_tensor(v) for k, v in inputs.items()}
    if memory is None:
        return keras.ops.convert_to_numpy(model(tensors))[:, 0], None
    with memory.capture_routing() as records:
        outputs = model(tensors)
    alphas = [keras.ops.convert_to_numpy(r["alpha"]) for r in sorted(records, key=lambda r: r["block"])]
    return keras.ops.convert_to_numpy(outputs)[:, 0], alphas


def routing_summary(alphas, regimes):
    """Per block: mean routing weight per regime x atom, and two statistics.

    `effective_atoms` is `exp(entropy)` of the mean atom usage (1: all
    weight on one atom; `num_atoms`: uniform). `regime_information` is the
    mutual information, in nats, between the regime and the atom drawn from
    the routing weights: `H(mean usage) - mean over regimes of H(usage in the
    regime)` (0: routing ignores the regime; at most `log 4`).
    """
    entropy = lambda p: float(-np.sum(p * np.log(np.clip(p, 1e-12, None))))  # noqa: E731
    blocks = []
    for alpha in alphas:
        per_regime = np.stack(
            [alpha[regimes == k].mean(axis=0) if np.any(regimes == k) else np.zeros(alpha.shape[1])
             for k in range(NUM_REGIMES)]
        )
        shares = np.bincount(regimes, minlength=NUM_REGIMES) / len(regimes)
        usage = alpha.mean(axis=0)
        blocks.append({
            "mean_alpha_per_regime": per_regime.tolist(),
            "effective_atoms": math.exp(entropy(usage)),
            "regime_information": entropy(usage) - sum(s * entropy(p) for s, p in zip(shares, per_regime)),
        })
    return blocks


def run_arm(arm, task, data, pretrained, config, rank, learning_rate, seed):
    """Builds, trains and evaluates one arm for one seed; returns its record."""
    start = time.perf_counter()
    keras.utils.set_random_seed(1000 + seed)
    model, memory, info = build_arm(arm, pretrained, config, rank)
    with warnings.catch_warnings():
        if arm == STATIC:
            # With one atom the routing weights get no gradient, as expected.
            warnings.filterwarnings("ignore", message="Gradients do not exist")
        losses = train(
            model, arm_inputs(arm, data, "train", seed), data[f"y_{task}_train"], config, learning_rate
        )
    record = {"seed": seed, "learning_rate": learning_rate, **info}
    for split in ("val", "test"):
        pred, alphas = predict(model, arm_inputs(arm, data, split, seed), memory)
        error = (pred - data[f"y_{task}_{split}"][:, 0]) ** 2
        record[f"{split}_mse"] = float(error.mean())
        if split == "test":
            record["test_mse_per_regime"] = [
                float(error[data["regime_test"] == k].mean()) if np.any(data["regime_test"] == k) else None
                for k in range(NUM_REGIMES)
            ]
            record["routing"] = None if alphas is None else routing_summary(alphas, data["regime_test"])
    record["window_losses"] = losses
    record["spikes"], record["worst_loss_ratio"] = spikes(losses, config["spike_factor"])
    record["base_weights_unchanged"] = base_weights_unchanged(model, pretrained)
    record["wall_time_s"] = time.perf_counter() - start
    return record


def base_weights_unchanged(model, pretrained):
    """Whether every Dense kernel and bias equals the pretrained one bit for bit, and is frozen."""
    trainable = {id(w) for w in model.trainable_weights}
    for layer, ref in zip(dense_layers(model), dense_layers(pretrained)):
        frozen = {w.name: w for w in layer.non_trainable_weights}
        for name, ref_weight in (("kernel", ref.kernel), ("bias", ref.bias)):
            weight = frozen.get(name)
            if weight is None or id(weight) in trainable:
                return False
            if not np.array_equal(keras.ops.convert_to_numpy(weight), keras.ops.convert_to_numpy(ref_weight)):
                return False
    return True


# %% [markdown]
# ## The experiment

# %%
def run(config, log=print, progress=True, command=None):
    """Runs the study; writes `results.json`, `results.md` and plots to `config["out"]`.

    Args:
        config: dict; missing keys take `DEFAULT_CONFIG`.
        log: print-like function for the summary lines.
        progress: show a progress bar.
        command: the command line to record; `None` records the call.

    Returns:
        The results dict that `results.json` holds, plus `"pretrained"`
        (the base model, not saved).
    """
    config = {**DEFAULT_CONFIG, **config}
    start = time.perf_counter()
    backend = keras.backend.backend()
    data = make_data(config)
    pretrained = pretrain(data, config)
    ranks, budget = match_ranks(pretrained, config)
    results = {
        "backend": backend,
        "keras_version": keras.__version__,
        "keras_qlora_version": keras_qlora.__version__,
        "command": command or f"KERAS_BACKEND={backend} regression_demo.run({config!r})",
        "config": config,
        "instructions": data["texts"],
        "parameter_budget": budget,
        "tasks": {},
    }
    sweep = len(config["learning_rates"]) > 1
    total = len(config["tasks"]) * len(config["arms"]) * (
        config["seeds"] + (len(config["learning_rates"]) * config["sweep_seeds"] if sweep else 0)
    )
    bar = tqdm(total=total, desc="training runs", disable=not progress, leave=False)
    for task in config["tasks"]:
        pred, _ = predict(pretrained, {"x": data["x_test"]})
        entry = {"base_test_mse": float(np.mean((pred - data[f"y_{task}_test"][:, 0]) ** 2)), "arms": {}}
        for arm in config["arms"]:
            sweep_runs = []
            for lr in config["learning_rates"] if sweep else ():
                for seed in range(config["sweep_seeds"]):
                    bar.set_postfix_str(f"{task} | {arm} | sweep lr {lr:g}")
                    record = run_arm(arm, task, data, pretrained, config, ranks[arm], lr, 100 + seed)
                    sweep_runs.append({"learning_rate": lr, "seed": 100 + seed, "val_mse": record["val_mse"]})
                    bar.update()
            lr = config["learning_rates"][0]
            if sweep:
                lr = min(config["learning_rates"], key=lambda v: np.mean(
                    [r["val_mse"] for r in sweep_runs if r["learning_rate"] == v]))
            runs = []
            for seed in range(config["seeds"]):
                bar.set_postfix_str(f"{task} | {arm} | seed {seed}")
                runs.append(run_arm(arm, task, data, pretrained, config, ranks[arm], lr, seed))
                bar.update()
            entry["arms"][arm] = {"learning_rate": lr, "sweep": sweep_runs, "runs": runs}
        results["tasks"][task] = entry
    bar.close()
    results["wall_time_s"] = time.perf_counter() - start
    out = pathlib.Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    results["plots"] = plot_all(results, out) if config["plots"] else []
    (out / "results.md").write_text(format_report(results))
    log(format_report(results))
    results["pretrained"] = pretrained
    return results


# %% [markdown]
# ## Reporting: tables and plots

# %%
def summarize_arm(entry):
    """Aggregates of one arm's runs (a dict of floats and ints)."""
    mse = np.asarray([r["test_mse"] for r in entry["runs"]])
    first = entry["runs"][0]
    return {
        "rank": first["rank"],
        "atoms": "-" if first["num_atoms"] is None else f"{first['num_atoms']} / {first['top_k']}",
        "trainable_params": first["trainable_params"],
        "learning_rate": entry["learning_rate"],
        "mean": float(mse.mean()),
        "std": float(mse.std(ddof=1)) if mse.size > 1 else 0.0,
        "min": float(mse.min()),
        "max": float(mse.max()),
        "spikes": sum(r["spikes"] for r in entry["runs"]),
        "worst_ratio": max(r["worst_loss_ratio"] for r in entry["runs"]),
        "frozen": all(r["base_weights_unchanged"] for r in entry["runs"]),
    }


def format_table(task_entry, seeds):
    """One task's results as a markdown table."""
    lines = [
        f"| arm | rank | atoms / top-k | trainable params | peak lr | test MSE (mean ± std, {seeds} seeds) "
        "| min – max | loss spikes (all seeds) | worst loss ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| Base (not adapted) | - | - | 0 | - | {task_entry['base_test_mse']:.4f} | - | - | - |",
    ]
    for arm, entry in task_entry["arms"].items():
        s = summarize_arm(entry)
        lines.append(
            f"| {arm} | {s['rank']} | {s['atoms']} | {s['trainable_params']:,} | {s['learning_rate']:g} | "
            f"{s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} – {s['max']:.4f} | {s['spikes']} | "
            f"{s['worst_ratio']:.2f} |"
        )
    return "\n".join(lines)


def format_routing(task_entry):
    """Routing statistics of the `keras_qlora` arms, mean over seeds, per block."""
    rows = []
    for arm, entry in task_entry["arms"].items():
        routings = [r["routing"] for r in entry["runs"] if r["routing"]]
        if not routings or entry["runs"][0]["num_atoms"] == 1:
            continue
        cells = []
        for block in range(len(routings[0])):
            eff = np.mean([r[block]["effective_atoms"] for r in routings])
            info = np.mean([r[block]["regime_information"] for r in routings])
            cells.append(f"{eff:.2f} / {info:.3f}")
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    blocks = rows[0].count("|") - 2
    return "\n".join([
        "| arm | " + " | ".join(f"block {b}" for b in range(blocks)) + " |",
        "|---|" + "---:|" * blocks,
        *rows,
    ])


def format_report(results):
    """The markdown report: setup, one table per task, routing statistics."""
    config = results["config"]
    sweep = len(config["learning_rates"]) > 1
    lines = [
        "# Noisy non-linear regression: LoRA vs Queryable LoRA",
        "",
        f"Backend `{results['backend']}` (Keras {results['keras_version']}, keras_qlora "
        f"{results['keras_qlora_version']}); wall time {results['wall_time_s']:.0f} s.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Base frozen in every arm; adapters on all {config['hidden_layers'] + 1} Dense layers; "
        f"{config['n_train']} noisy training points (noise std {config['noise_std']}), "
        f"{config['n_test']} noise-free test points. Adam, cosine decay to "
        f"{config['final_lr_fraction']:g} x peak, {config['epochs']} epochs, batch {config['batch_size']}. "
        + (f"Peak learning rate chosen per arm and task from {config['learning_rates']} by validation MSE "
           f"({config['sweep_seeds']} seed(s) per value, seeds not among the reported ones). "
           if sweep else f"One peak learning rate for every arm: {config['learning_rates'][0]:g} (not tuned). ")
        + f"Parameters matched from above: every arm has at least {results['parameter_budget']:,} trainable "
        "parameters, the count of the largest Queryable LoRA arm; the Queryable LoRA arms share rank and "
        "atoms, so those without the prior or summary have fewer. Spikes: windows of "
        f"{config['spike_window']} steps whose mean training loss exceeds {config['spike_factor']:g}x the "
        "lowest earlier window; worst loss ratio: the largest such ratio over all windows and seeds.",
    ]
    for task, entry in results["tasks"].items():
        frozen = all(summarize_arm(e)["frozen"] for e in entry["arms"].values())
        lines += ["", f"## Task `{task}`", "", format_table(entry, config["seeds"]), "",
                  f"Frozen base weights bit-identical after training in every run: {frozen}."]
        routing = format_routing(entry)
        if routing:
            lines += ["", "Routing on the test set (effective atoms used / information about the regime, "
                      "nats, max log 4 = 1.386), mean over seeds:", "", routing]
    if results.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{pathlib.Path(p).name}`" for p in results["plots"]) + "."]
    return "\n".join(lines) + "\n"


def plot_all(results, out):
    """Learning curves and routing heatmaps, one PNG each per task; returns the paths."""
    from matplotlib.figure import Figure

    paths = []
    config = results["config"]
    windows_per_epoch = math.ceil(math.ceil(config["n_train"] / config["batch_size"]) / config["spike_window"])
    for task, entry in results["tasks"].items():
        fig = Figure(figsize=(8, 5))
        ax = fig.subplots()
        for arm, arm_entry in entry["arms"].items():
            curves = np.asarray([r["window_losses"] for r in arm_entry["runs"]])
            epochs = np.arange(1, curves.shape[1] + 1) / windows_per_epoch
            line, = ax.plot(epochs, curves.mean(axis=0), label=arm, linewidth=1.2)
            ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.axhline(config["noise_std"] ** 2, color="grey", linestyle=":", label="noise variance")
        ax.set(yscale="log", xlabel="epoch", ylabel=f"training loss (mean of {config['spike_window']} steps)",
               title=f"task '{task}': mean over seeds, band = min to max")
        ax.legend(fontsize=8)
        path = out / f"learning_curves_{task}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(str(path))

        arms = [a for a, e in entry["arms"].items()
                if e["runs"][0]["routing"] and e["runs"][0]["num_atoms"] > 1]
        if not arms:
            continue
        blocks = len(entry["arms"][arms[0]]["runs"][0]["routing"])
        fig = Figure(figsize=(3.2 * blocks, 1.9 * len(arms) + 0.6), layout="constrained")
        axes = np.asarray(fig.subplots(len(arms), blocks, squeeze=False))
        for i, arm in enumerate(arms):
            for b in range(blocks):
                heat = np.asarray(entry["arms"][arm]["runs"][0]["routing"][b]["mean_alpha_per_regime"])
                image = axes[i, b].imshow(heat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                axes[i, b].set(xticks=range(heat.shape[1]), yticks=range(NUM_REGIMES),
                               xlabel="atom" if i == len(arms) - 1 else None,
                               ylabel=f"{arm}\nregime" if b == 0 else None)
                axes[i, b].set_title(f"block {b}", fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.6, label="mean routing weight")
        fig.suptitle(f"task '{task}': routing per regime (test set, seed 0)")
        path = out / f"routing_{task}.png"
        fig.savefig(path, dpi=110)
        paths.append(str(path))
    return paths


# %% [markdown]
# ## Run
#
# From a shell: `--full` for the complete study, `--smoke` for a run of
# seconds; `--seeds`, `--epochs`, `--tasks`, `--arms` and `--out` override
# single settings. In a notebook the cell below runs the default
# configuration.

# %%
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the complete study (5 seeds, lr sweep)")
    size.add_argument("--smoke", action="store_true", help="a run of seconds (tests)")
    parser.add_argument("--seeds", type=int, help="seeds per arm")
    parser.add_argument("--epochs", type=int, help="adaptation epochs")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="tasks to run")
    parser.add_argument("--arms", nargs="+", choices=ARMS, metavar="ARM", help=f"arms to run, of {ARMS}")
    parser.add_argument("--out", help="output folder (default outputs/regression)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if argv is None:
        # In a notebook, sys.argv holds the kernel's arguments, not ours.
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    args = parser.parse_args(argv)
    config = dict(DEFAULT_CONFIG)
    config.update(FULL_CONFIG if args.full else SMOKE_CONFIG if args.smoke else {})
    for key in ("seeds", "epochs", "tasks", "arms", "out"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    command = " ".join([f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/regression_demo.py", *argv])
    return run(config, progress=not args.no_progress, command=command)


if __name__ == "__main__":
    results = main()
