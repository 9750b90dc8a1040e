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
