"""Parameter accounting (METHOD.md section 5)."""

import keras

import keras_qlora
from conftest import mlp


def test_counts_follow_the_method_formula():
    r, m, dk, ds, blocks, de = 4, 6, 8, 5, 3, 7
    prior = keras_qlora.InstructionPrior(embedding_dim=de, instruction_in_query=True)
    memory = keras_qlora.AtomMemory(
        num_atoms=m, rank=r, key_dim=dk, summary_dim=ds, num_blocks=blocks, prior=prior
    )
    model = mlp(memory, widths=(24, 16, 3), input_dim=12)
    counts = keras_qlora.count_parameters(model)
    dims = [(12, 24), (24, 16), (16, 3)]
    assert counts["adapters"] == sum(r * (i + o) for i, o in dims)
    assert counts["lora_equivalent"] == counts["adapters"]
    assert counts["memory"] == m * r * r + m * dk + (r + ds) * dk + blocks * dk + m * ds + 2 * ds
    assert counts["prior"] == de * m + de * dk
    assert counts["trainable"] == counts["adapters"] + counts["memory"] + counts["prior"]
    assert counts["total"] == counts["trainable"] + sum(i * o + o for i, o in dims)


def test_summary_modes_create_only_the_weights_they_use():
    base = dict(num_atoms=4, rank=2, key_dim=3, summary_dim=5)
    sizes = {
        mode: keras_qlora.count_parameters(keras_qlora.AtomMemory(summary=mode, **base))["memory"]
        for mode in ("attention", "ema", "none")
    }
    assert sizes["attention"] - sizes["ema"] == 5
    assert sizes["ema"] - sizes["none"] == 4 * 5


def test_einsum_counts_in_both_conventions():
    memory = keras_qlora.AtomMemory(num_atoms=2, rank=4)
    layer = keras_qlora.QueryableLoRAEinsumDense("abc,cde->abde", (None, 3, 8), memory=memory)
    model = keras.Sequential([keras.Input((5, 16)), layer])
    counts = keras_qlora.count_parameters(model)
    assert counts["lora_equivalent"] == 4 * (16 + 3 * 8)
    assert counts["keras_lora_equivalent"] == 4 * (16 * 3 + 8)


def test_print_trainable_parameters_uses_the_peft_format(capsys):
    memory = keras_qlora.AtomMemory(num_atoms=2, rank=2, num_blocks=3)
    model = mlp(memory)
    counts = keras_qlora.print_trainable_parameters(model)
    first = capsys.readouterr().out.splitlines()[0]
    share = 100 * counts["trainable"] / counts["total"]
    assert first == (
        f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || trainable%: {share:.4f}"
    )
