"""The pure routing functions against NumPy."""

import numpy as np
import pytest
from keras import ops

from keras_qlora import routing
from reference import rms_norm, softmax, to_numpy, top_k_softmax


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype("float32")
    np.testing.assert_allclose(to_numpy(routing.rms_norm(x)), rms_norm(x.astype(np.float64)), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_softmax_is_a_convex_combination_of_exactly_k_atoms(k):
    logits = np.random.default_rng(k).normal(size=(4, 6, 7)).astype("float32")
    alpha = to_numpy(routing.top_k_softmax(ops.convert_to_tensor(logits), k))
    assert (alpha >= 0).all()
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-6)
    assert ((alpha > 0).sum(-1) == k).all()
    np.testing.assert_allclose(alpha, top_k_softmax(logits.astype(np.float64), k), rtol=1e-5, atol=1e-7)


def test_top_k_softmax_with_k_equal_to_atoms_is_dense_softmax():
    logits = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(routing.top_k_softmax(ops.convert_to_tensor(logits), 4)), softmax(logits), rtol=1e-5
    )


def test_top_k_softmax_is_finite_for_extreme_logits():
    logits = np.array([[1e30, -1e30, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]], "float32")
    alpha = to_numpy(routing.top_k_softmax(ops.convert_to_tensor(logits), 2))
    assert np.isfinite(alpha).all()
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-6)


def test_mix_atoms_applies_the_mixture_of_matrices():
    rng = np.random.default_rng(2)
    alpha = softmax(rng.normal(size=(3, 2, 5)))
    z = rng.normal(size=(3, 2, 4))
    atoms = rng.normal(size=(5, 4, 4))
    expected = np.einsum("bti,btij->btj", z, np.einsum("btm,mij->btij", alpha, atoms))
    got = routing.mix_atoms(*(ops.convert_to_tensor(a.astype("float32")) for a in (alpha, z, atoms)))
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-4, atol=1e-5)


def test_attention_summary_with_zero_query_is_the_mean_of_reads():
    rng = np.random.default_rng(3)
    reads = [rng.normal(size=(2, 3, 6)).astype("float32") for _ in range(3)]
    got = routing.attention_summary(reads, np.zeros(6, "float32"), np.zeros(6, "float32"))
    np.testing.assert_allclose(to_numpy(got), np.mean(reads, axis=0), rtol=1e-5, atol=1e-6)


def test_ema_summary_recurrence():
    reads = [np.full((2, 4), v, "float32") for v in (1.0, 3.0)]
    s0 = np.full(4, 2.0, "float32")
    got = to_numpy(routing.ema_summary(reads, 0.5, s0))
    np.testing.assert_allclose(got, np.full((2, 4), 0.5 * (0.5 * 2 + 0.5 * 1) + 0.5 * 3))


def test_kl_to_routing_matches_numpy():
    rng = np.random.default_rng(4)
    log_pi = np.log(softmax(rng.normal(size=(2, 5))))
    logits = rng.normal(size=(2, 3, 5))
    p_bar = softmax(logits).mean(axis=1)
    expected = np.mean(np.sum(np.exp(log_pi) * (log_pi - np.log(p_bar)), axis=-1))
    got = routing.kl_to_routing(*(ops.convert_to_tensor(a.astype("float32")) for a in (log_pi, logits)))
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-4)


# -- the sparse path the layers use ------------------------------------------


def _gradient(f, x):
    """d sum(f(x)) / dx on the current backend, as NumPy."""
    import keras

    backend = keras.backend.backend()
    x = np.asarray(x, "float32")
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: ops.sum(f(v)))(x), np.float64)
    if backend == "torch":
        import torch

        v = torch.tensor(x, requires_grad=True)
        ops.sum(f(v)).backward()
        return v.grad.numpy().astype(np.float64)
    import tensorflow as tf

    v = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(v)
        y = ops.sum(f(v))
    return tf.convert_to_tensor(tape.gradient(y, v)).numpy().astype(np.float64)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_select_atoms_matches_the_dense_top_k_softmax(k):
    logits = np.random.default_rng(10 + k).normal(size=(4, 3, 7)).astype("float32")
    selection = routing.select_atoms(ops.convert_to_tensor(logits), k)
    expected = top_k_softmax(logits.astype(np.float64), k)
    np.testing.assert_allclose(to_numpy(selection.dense()), expected, rtol=1e-5, atol=1e-7)
    table = np.random.default_rng(1).normal(size=(7, 5)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(selection.combine(ops.convert_to_tensor(table))), expected @ table, rtol=1e-5, atol=1e-6
    )
    # k == M is the dense softmax, kept without indices.
    assert (selection.indices is None) == (k == 7)


def test_select_atoms_keeps_exactly_k_atoms_on_ties():
    logits = np.zeros((3, 5), "float32")
    alpha = to_numpy(routing.select_atoms(ops.convert_to_tensor(logits), 2).dense())
    np.testing.assert_array_equal((alpha > 0).sum(-1), 2)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-6)


def test_select_atoms_with_a_single_atom_is_all_ones():
    selection = routing.select_atoms(ops.convert_to_tensor(np.full((2, 3, 1), -5.0, "float32")), 2)
    np.testing.assert_array_equal(to_numpy(selection.dense()), np.ones((2, 3, 1)))


@pytest.mark.parametrize("k", [2, 5])
def test_gathered_atoms_applied_to_z_equal_the_dense_mixture(k):
    rng = np.random.default_rng(20 + k)
    logits = rng.normal(size=(3, 4, 5)).astype("float32")
    z = rng.normal(size=(3, 4, 6)).astype("float32")
    atoms = rng.normal(size=(5, 6, 6)).astype("float32")
    alpha = top_k_softmax(logits.astype(np.float64), k)
    expected = np.einsum("bti,btij->btj", z, np.einsum("btm,mij->btij", alpha, atoms))
    selection = routing.select_atoms(ops.convert_to_tensor(logits), k)
    gathered = routing.gather_atoms(selection, ops.convert_to_tensor(atoms))
    assert tuple(gathered.shape) == ((3, 4, k, 6, 6) if k < 5 else (5, 6, 6))
    got = routing.apply_atoms(selection, selection.weights, ops.convert_to_tensor(z), gathered)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-4, atol=1e-5)


def test_sparse_routing_has_the_gradients_of_the_dense_form():
    rng = np.random.default_rng(30)
    logits = rng.normal(size=(4, 6)).astype("float32")
    z = ops.convert_to_tensor(rng.normal(size=(4, 3)).astype("float32"))
    atoms = rng.normal(size=(6, 3, 3)).astype("float32")
    weight = ops.convert_to_tensor(rng.normal(size=(4, 3)).astype("float32"))

    def sparse(logits=logits, atoms=atoms):
        logits, atoms = ops.convert_to_tensor(logits), ops.convert_to_tensor(atoms)
        selection = routing.select_atoms(logits, 2)
        return routing.apply_atoms(selection, selection.weights, z, routing.gather_atoms(selection, atoms)) * weight

    def dense(logits=logits, atoms=atoms):
        logits, atoms = ops.convert_to_tensor(logits), ops.convert_to_tensor(atoms)
        return routing.mix_atoms(routing.top_k_softmax(logits, 2), z, atoms) * weight

    for wrt in ("logits", "atoms"):
        got = _gradient(lambda v: sparse(**{wrt: v}), locals()[wrt])
        want = _gradient(lambda v: dense(**{wrt: v}), locals()[wrt])
        assert np.abs(want).max() > 1e-3  # the check is not vacuous
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
