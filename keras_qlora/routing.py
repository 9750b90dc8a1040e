"""The routing math of Queryable LoRA, as pure functions of `keras.ops`.

This follows the paper's description (arXiv 2605.08423); its exact equations
were not published in reach, so `METHOD.md` of this project is the definition
implemented here. Every function works on any leading shape ("positions"): it
never mixes two positions, which keeps causal models causal.
"""

from keras import ops

RMS_EPSILON = 1e-6
# Added to the logits of unselected atoms: finite, so no inf enters a gradient.
_MASKED_LOGIT = -1e9


def rms_norm(x):
    """`x / sqrt(mean(x**2) + eps)` over the last axis, without a scale."""
    # Keras's op is exactly this (one fused kernel on PyTorch).
    return ops.rms_normalization(x, axis=-1, epsilon=RMS_EPSILON)


def top_k_softmax(logits, k):
    """Softmax over the `k` largest logits of the last axis, zero elsewhere.

    The result is a convex combination: non-negative, sums to one, with `k`
    non-zeros when no two logits tie at the k-th place. With `k` equal to the
    number of atoms it is the dense softmax. This dense form is the plain
    statement of the definition; the layers route with `select_atoms`. Selection is by a threshold on
    the k-th value, so no index arithmetic (whose tie-breaking and
    out-of-range behaviour differ per backend) is involved.
    """
    if logits.shape[-1] == 1:
        return ops.ones_like(logits)
    if k >= logits.shape[-1]:
        return ops.softmax(logits, axis=-1)
    top = ops.top_k(logits, k, sorted=True)[0]
    kept = ops.greater_equal(logits, top[..., k - 1 : k])
    # Shifted so the best logit is 0: the finite mask then stays below every
    # kept logit that carries weight, however negative the logits are.
    shifted = logits - ops.stop_gradient(top[..., :1])
    return ops.softmax(ops.where(kept, shifted, _MASKED_LOGIT), axis=-1)


def mix_atoms(alpha, z, atoms):
    """`R z = sum_m alpha_m (U_m z)` for every position, from dense weights.

    Args:
        alpha: `(..., M)` routing weights.
        z: `(..., r)` low-rank state.
        atoms: `(M, r, r)`; `U_m z` is the row vector `z @ U_m`.

    One contraction over `(m, i)` of the outer product `alpha ⊗ z` with the
    stacked atoms: `M r²` multiply-adds per position, whatever the number of
    non-zero weights. The layers use `select_atoms`, `gather_atoms` and
    `apply_atoms` instead, whose cost does not grow with `M`; this dense
    form serves the dense softmax (`k = M`) and states the definition.
    """
    weighted = ops.multiply(ops.expand_dims(alpha, -1), ops.expand_dims(z, -2))
    return ops.einsum("...mi,mij->...j", weighted, atoms)


class Selection:
    """The routing weights of one decision, kept sparse.

    `weights` `(..., k)` are the softmax over the `k` largest logits and
    `indices` `(..., k)` the atoms they belong to. With `k` equal to the
    number of atoms (the dense softmax) `indices` is `None` and `weights`
    holds all `M` weights in atom order.
    """

    def __init__(self, weights, indices, num_atoms):
        self.weights = weights
        self.indices = indices
        self.num_atoms = num_atoms
        self._dense = None

    def dense(self):
        """The `(..., M)` weights `alpha`, zero on atoms not selected."""
        if self._dense is None:
            if self.indices is None:
                self._dense = self.weights
            else:
                one_hot = ops.one_hot(self.indices, self.num_atoms, dtype=self.weights.dtype)
                self._dense = ops.sum(ops.multiply(one_hot, ops.expand_dims(self.weights, -1)), axis=-2)
        return self._dense

    def combine(self, table):
        """`sum_m alpha_m table_m` for a `(M, d)` table, per position.

        Gathers the `k` selected rows, so the cost is `k` rows, not `M`.
        """
        if self.indices is None:
            return ops.matmul(self.weights, table)
        return ops.einsum("...k,...kd->...d", self.weights, ops.take(table, self.indices, axis=0))


def select_atoms(logits, k):
    """The top-`k` softmax of the last axis, as a sparse `Selection`.

    Equal to `top_k_softmax(logits, k)` when no two logits tie at the k-th
    place; on a tie it keeps exactly `k` atoms (which ones is up to the
    backend's `top_k`), where the threshold form keeps every tied atom.
    """
    num_atoms = logits.shape[-1]
    if num_atoms == 1:
        return Selection(ops.ones_like(logits), None, 1)
    if k >= num_atoms:
        return Selection(ops.softmax(logits, axis=-1), None, num_atoms)
    values, indices = ops.top_k(logits, k, sorted=True)
    return Selection(ops.softmax(values, axis=-1), indices, num_atoms)


def gather_atoms(selection, atoms):
    """The atoms a decision uses: `(..., k, r, r)` per position.

    The `k` selected atoms, gathered once per routing decision and shared by
    every layer that reuses the decision. With the dense softmax (no
    indices) it is the `(M, r, r)` stack itself.
    """
    if selection.indices is None:
        return atoms
    return ops.take(atoms, selection.indices, axis=0)


def apply_atoms(selection, weights, z, gathered):
    """`R z = sum_k w_k (z @ U_k)` per position.

    Args:
        selection: the decision's `Selection` (it says whether `gathered`
            is the dense stack).
        weights: `(..., k)` weights of the gathered atoms (or `(..., M)`
            with the dense stack): `selection.weights`, possibly gated.
        z: `(..., r)` low-rank state.
        gathered: what `gather_atoms(selection, atoms)` returned.

    Written as one product and a sum over `(k, i)`, which XLA fuses into a
    single reduction: `k r²` multiply-adds per position and layer, nothing
    per position that grows with the number of atoms, and no `r x r`
    operator kept per position. Training keeps the gathered `k r²` atom
    entries per position for the backward pass, once per decision.
    """
    if selection.indices is None:  # the dense (M, r, r) stack
        return mix_atoms(weights, z, gathered)
    weighted = ops.expand_dims(ops.expand_dims(weights, -1) * ops.expand_dims(z, -2), -1)
    return ops.sum(weighted * gathered, axis=(-3, -2))


def attention_fold(state, read, depth_query):
    """Adds one finished block's read to an attention-over-depth summary.

    The summary `sum_j beta_j v_j`, `beta = softmax_j(<w, rms(v_j)>)`, is
    kept as an online softmax: `state = (max score, sum_j e_j v_j, sum_j
    e_j)` with `e_j = exp(score_j - max)`. A read's score does not depend on
    which block reads the summary, so every read is scored once and the
    work per block stays constant however deep the model is.

    Args:
        state: the previous state, or `None` before the first read.
        read: `(..., d_s)` read `v_j` of the block that just finished.
        depth_query: `(d_s,)` vector `w`.
    """
    score = ops.sum(rms_norm(read) * depth_query, axis=-1, keepdims=True)
    read = ops.convert_to_tensor(read)
    if state is None:
        return score, read, ops.ones_like(score)
    best, weighted, total = state
    new_best = ops.maximum(best, score)
    old_scale = ops.exp(ops.subtract(best, new_best))
    new_scale = ops.exp(ops.subtract(score, new_best))
    return (
        new_best,
        ops.add(ops.multiply(weighted, old_scale), ops.multiply(read, new_scale)),
        ops.add(ops.multiply(total, old_scale), new_scale),
    )


def attention_value(state, initial):
    """The summary an `attention_fold` state holds (`initial` before any read)."""
    if state is None:
        return initial
    _, weighted, total = state
    return ops.divide(weighted, total)


def attention_summary(reads, depth_query, initial):
    """Attention over depth: `sum_j beta_j v_j`, `beta = softmax(<w, rms(v_j)>)`.

    Args:
        reads: list of `(..., d_s)` tensors, one per finished block.
        depth_query: `(d_s,)` vector `w`.
        initial: `(d_s,)` summary `s_0` used when no block has finished.
    """
    state = None
    for read in reads:
        state = attention_fold(state, read, depth_query)
    return attention_value(state, initial)


def ema_fold(summary, read, momentum):
    """One step of the moving average: `mu s + (1 - mu) v`."""
    return ops.add(ops.multiply(momentum, summary), ops.multiply(1.0 - momentum, read))


def ema_summary(reads, momentum, initial):
    """Exponential moving average: `s_b = mu s_{b-1} + (1 - mu) v_{b-1}`."""
    summary = initial
    for read in reads:
        summary = ema_fold(summary, read, momentum)
    return summary


def expand_to_positions(per_example, like):
    """Broadcasts `(batch, n)` over the positions of `like` `(batch, ..., k)`."""
    for _ in range(len(like.shape) - 2):
        per_example = ops.expand_dims(per_example, 1)
    return per_example


def kl_to_routing(log_prior, logits):
    """`KL(pi || mean over positions of softmax(logits))`, averaged over batch.

    Args:
        log_prior: `(batch, M)` log-probabilities `log pi`.
        logits: `(batch, ..., M)` routing logits.
    """
    probs = ops.softmax(logits, axis=-1)
    position_axes = tuple(range(1, len(logits.shape) - 1))
    if position_axes:
        probs = ops.mean(probs, axis=position_axes)
    prior = ops.exp(log_prior)
    kl = ops.sum(prior * (log_prior - ops.log(probs + 1e-12)), axis=-1)
    return ops.mean(kl)
