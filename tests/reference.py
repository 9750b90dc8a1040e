"""An independent NumPy implementation of METHOD.md, for the tests.

Written from the method's equations, not from the library: it concatenates
state and summary before one query matmul, selects atoms by `argsort` (not by
a threshold), mixes the `r x r` matrices before applying them, and walks the
blocks of a model explicitly.
"""

import numpy as np
from keras import ops


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def rms_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k_softmax(logits, k):
    order = np.argsort(-logits, axis=-1)[..., :k]
    chosen = np.take_along_axis(logits, order, axis=-1)
    out = np.zeros_like(logits)
    np.put_along_axis(out, order, softmax(chosen), axis=-1)
    return out


def memory_weights(memory):
    names = ["atoms", "keys", "query_kernel", "block_embeddings", "summary_init", "atom_values", "depth_query"]
    weights = {n: None if getattr(memory, n) is None else to_numpy(getattr(memory, n)) for n in names}
    if memory.prior is not None:
        weights["prior_kernel"] = to_numpy(memory.prior.prior_kernel)
        qk = memory.prior.query_kernel
        weights["prior_query_kernel"] = None if qk is None else to_numpy(qk)
    return weights


def log_prior(memory, w, instruction):
    logits = np.asarray(instruction, np.float64) @ w["prior_kernel"] / memory.prior.prior_temperature
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def route(memory, w, z, block, summary, instruction=None):
    """Returns (alpha, read, logits) for `z` of shape (batch, ..., r)."""
    summary = np.broadcast_to(summary, z.shape[:-1] + (memory.summary_dim,))
    query = np.concatenate([rms_norm(z), summary], axis=-1) @ w["query_kernel"]
    query = query + w["block_embeddings"][block]
    extra = (1,) * (z.ndim - 2)
    if instruction is not None and memory.prior.instruction_in_query:
        bias = np.asarray(instruction, np.float64) @ w["prior_query_kernel"]
        query = query + bias.reshape(bias.shape[:1] + extra + bias.shape[1:])
    logits = query @ w["keys"].T / (memory.temperature * np.sqrt(memory.key_dim))
    if instruction is not None:
        lp = log_prior(memory, w, instruction)
        logits = logits + memory.prior.prior_strength * lp.reshape(lp.shape[:1] + extra + lp.shape[1:])
    alpha = top_k_softmax(logits, memory.top_k)
    read = None if w["atom_values"] is None else alpha @ w["atom_values"]
    return alpha, read, logits


def summarize(memory, w, reads):
    if memory.summary == "none" or not reads:
        return w["summary_init"]
    if memory.summary == "ema":
        s = w["summary_init"]
        for v in reads:
            s = memory.summary_momentum * s + (1 - memory.summary_momentum) * v
        return s
    stacked = np.stack(reads, axis=-2)
    beta = softmax(rms_norm(stacked) @ w["depth_query"])
    return np.sum(beta[..., None] * stacked, axis=-2)


def apply_routed(alpha, z, atoms):
    mixed = np.einsum("...m,mij->...ij", alpha, atoms)
    return np.einsum("...i,...ij->...j", z, mixed)


def dense_forward(layers, memory, x, instruction=None):
    """Runs a stack of adapted `Dense` layers (depth order) in NumPy.

    Returns the output and the list of per-layer routing weights.
    """
    w = memory_weights(memory)
    h = np.asarray(x, np.float64)
    finished, current, block, alpha = [], [], -1, None
    alphas = []
    for layer in layers:
        if layer.block > block:
            if current:
                finished.append(np.mean(current, axis=0))
            current, block, alpha = [], layer.block, None
        a, b = to_numpy(layer.qlora_a), to_numpy(layer.qlora_b)
        z = h @ a
        if memory.routing == "layer" or alpha is None:
            alpha, read, _ = route(memory, w, z, block, summarize(memory, w, finished), instruction)
            if read is not None:
                current.append(read)
        alphas.append(alpha)
        y = h @ to_numpy(layer.kernel)
        if layer.bias is not None:
            y = y + to_numpy(layer.bias)
        y = y + layer.lora_scale * apply_routed(alpha, z, w["atoms"]) @ b
        name = getattr(layer.activation, "__name__", "linear")
        h = {"linear": lambda t: t, "relu": lambda t: np.maximum(t, 0), "tanh": np.tanh}[name](y)
    return h, alphas
