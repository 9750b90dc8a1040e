"""A table of bad inputs through the public API.

Every row is one wrong call. Each must raise a `ValueError` or `TypeError`
whose message names the argument and the value received, and leave the
user's model exactly as it was: the class of every layer, every weight's
path, dtype, value and trainable flag, and `keras_qlora.get_memory`.
(`tests/test_errors.py` holds the constructor cases written first; none is
repeated here.)
"""

import numpy as np
import pytest
import keras

import keras_qlora
from backbones import FAMILIES
from reference import to_numpy

# -- subjects: the user's objects a bad call must leave alone -------------


def _dense():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    return layer


def _memory():
    return keras_qlora.AtomMemory(num_atoms=4, rank=2, num_blocks=2)


def _adapted():
    layer = keras_qlora.QueryableLoRADense(3, memory=_memory())
    layer.build((None, 4))
    return layer


def _backbone(name="llama"):
    backbone_cls, _, kwargs = FAMILIES[name]
    return backbone_cls(**kwargs)


def _enabled(prior=True):
    backbone = _backbone()
    prior = keras_qlora.InstructionPrior(embedding_dim=3) if prior else None
    keras_qlora.enable(backbone, rank=2, num_atoms=4, prior=prior)
    return backbone


def _lm():
    _, lm_cls, _ = FAMILIES["llama"]
    return lm_cls(backbone=_enabled(), preprocessor=None)


SUBJECTS = {
    "none": lambda: None,
    "dense": _dense,
    "memory": _memory,
    "adapted": _adapted,
    "backbone": _backbone,
    "gemma": lambda: _backbone("gemma"),
    "enabled": _enabled,
    "enabled_no_prior": lambda: _enabled(prior=False),
    "lm": _lm,
}
_BUILT = {}


def _subject(name):
    # Shared between rows: each row compares the subject with itself
    # before and after, so a row that changed it fails on its own.
    if name not in _BUILT:
        _BUILT[name] = SUBJECTS[name]()
    return _BUILT[name]


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "llama.safetensors"
    keras_qlora.save_adapter(_enabled(prior=False), path)
    return str(path)


def _ids():
    ids = np.ones((1, 4), "int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")}


def _use_instruction(model, instruction):
    with keras_qlora.use_instruction(model, instruction):
        pass


def _disable(model):
    with keras_qlora.disable_adapter(model):
        pass


def _memory_of(layer):
    return layer.memory


# -- the table --------------------------------------------------------------
# (id, subject, call(subject, adapter_file), text the message must contain)

CASES = [
    # AtomMemory
    ("memory num_atoms str", "none", lambda s, f: keras_qlora.AtomMemory(num_atoms="8", rank=2), "num_atoms='8'"),
    ("memory rank bool", "none", lambda s, f: keras_qlora.AtomMemory(num_atoms=4, rank=True), "rank=True"),
    ("memory key_dim 0", "none", lambda s, f: keras_qlora.AtomMemory(4, 2, key_dim=0), "key_dim=0"),
    ("memory summary_dim -1", "none", lambda s, f: keras_qlora.AtomMemory(4, 2, summary_dim=-1), "summary_dim=-1"),
    ("memory temperature str", "none", lambda s, f: keras_qlora.AtomMemory(4, 2, temperature="hot"), "temperature='hot'"),
    ("memory momentum < 0", "none", lambda s, f: keras_qlora.AtomMemory(4, 2, summary_momentum=-0.1), "summary_momentum=-0.1"),
    ("memory initializer int", "none", lambda s, f: keras_qlora.AtomMemory(4, 2, atom_initializer=3), "atom_initializer=3"),
    ("memory prior of other size", "none",
     lambda s, f: keras_qlora.AtomMemory(4, 2, prior=keras_qlora.InstructionPrior(4, num_atoms=7)), "num_atoms=4"),
    ("memory unknown kwarg", "none", lambda s, f: keras_qlora.AtomMemory(4, 2, atoms=3), "'atoms': 3"),
    # InstructionPrior
    ("prior embedding_dim None", "none", lambda s, f: keras_qlora.InstructionPrior(embedding_dim=None), "embedding_dim=None"),
    ("prior kl weight < 0", "none", lambda s, f: keras_qlora.InstructionPrior(4, prior_kl_weight=-1), "prior_kl_weight=-1"),
    ("prior in query str", "none", lambda s, f: keras_qlora.InstructionPrior(4, instruction_in_query="yes"), "instruction_in_query='yes'"),
    # The layers
    ("dense block str", "memory", lambda s, f: keras_qlora.QueryableLoRADense(3, memory=s, block="0"), "block='0'"),
    ("dense block bool", "memory", lambda s, f: keras_qlora.QueryableLoRADense(3, memory=s, block=True), "block=True"),
    ("dense rslora int", "memory", lambda s, f: keras_qlora.QueryableLoRADense(3, memory=s, rslora=1), "rslora=1"),
    ("dense lora_alpha str", "memory", lambda s, f: keras_qlora.QueryableLoRADense(3, memory=s, lora_alpha="big"), "lora_alpha='big'"),
    ("dense a_initializer", "memory", lambda s, f: keras_qlora.QueryableLoRADense(3, memory=s, a_initializer="nope"), "a_initializer='nope'"),
    ("einsum memory None", "none", lambda s, f: keras_qlora.QueryableLoRAEinsumDense("ab,bc->ac", (3,), memory=None), "memory=None"),
    ("einsum bad equation", "memory",
     lambda s, f: keras_qlora.QueryableLoRAEinsumDense("ab->c", (3,), memory=s).build((2, 4)), "equation 'ab->c'"),
    ("adapted input width", "adapted", lambda s, f: s(np.ones((2, 5), "float32")), "received input with shape (2, 5)"),
    ("adapted instruction without prior", "adapted",
     lambda s, f: s(np.ones((2, 4), "float32"), instruction=np.ones((2, 3), "float32")), "instruction with shape (2, 3)"),
    # adapt
    ("adapt a str", "none", lambda s, f: keras_qlora.adapt("dense", _memory()), "layer='dense'"),
    ("adapt memory None", "dense", lambda s, f: keras_qlora.adapt(s, None), "memory=None"),
    ("adapt block float", "dense", lambda s, f: keras_qlora.adapt(s, _memory(), block=1.0), "block=1.0"),
    ("adapt b_initializer", "dense", lambda s, f: keras_qlora.adapt(s, _memory(), b_initializer=object), "b_initializer=<class 'object'>"),
    ("adapt rank of other memory", "dense", lambda s, f: keras_qlora.adapt(s, _memory(), rank=8), "rank=8"),
    ("adapt an adapted layer", "adapted", lambda s, f: keras_qlora.adapt(s, _memory_of(s)), "already adapted"),
    # enable
    ("enable a str", "none", lambda s, f: keras_qlora.enable("llama", rank=2), "backbone='llama'"),
    ("enable rank 0", "backbone", lambda s, f: keras_qlora.enable(s, rank=0), "rank=0"),
    ("enable rank str", "backbone", lambda s, f: keras_qlora.enable(s, rank="8"), "rank='8'"),
    ("enable block_size 0", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, block_size=0), "block_size=0"),
    ("enable targets as str", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, target_layer_names="query"), "target_layer_names='query'"),
    ("enable unknown target", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, target_layer_names=["qkv"]), "target_layer_names=['qkv']"),
    ("enable exclude ints", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, exclude=[3]), "exclude=[3]"),
    ("enable block out of range", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, layers_to_transform=[5]), "layers_to_transform=[5]"),
    ("enable no blocks", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, layers_to_transform=[]), "layers_to_transform=[]"),
    ("enable num_blocks", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, num_blocks=3), "'num_blocks': 3"),
    ("enable top_k > atoms", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, num_atoms=4, top_k=9), "top_k=9"),
    ("enable lora_alpha < 0", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, num_atoms=4, lora_alpha=-1.0), "lora_alpha=-1.0"),
    ("enable summary", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, num_atoms=4, summary="max"), "summary='max'"),
    ("enable unknown kwarg", "backbone", lambda s, f: keras_qlora.enable(s, rank=2, num_atom=4), "'num_atom': 4"),
    ("enable twice", "enabled", lambda s, f: keras_qlora.enable(s, rank=2, num_atoms=4), "backbone='llama_backbone"),
    # save_adapter / load_adapter
    ("save without adapter", "backbone", lambda s, f: keras_qlora.save_adapter(s, f + ".x.safetensors"), "model='llama_backbone"),
    ("save to other suffix", "enabled", lambda s, f: keras_qlora.save_adapter(s, "adapter.bin"), "path='adapter.bin'"),
    ("load path int", "enabled", lambda s, f: keras_qlora.load_adapter(s, 42), "path=42"),
    ("load onto another backbone", "gemma", lambda s, f: keras_qlora.load_adapter(s, f), "does not fit `model`"),
    ("load into a str", "none", lambda s, f: keras_qlora.load_adapter("llama", f), "backbone='llama'"),
    # instructions
    ("use_instruction batch of 2", "enabled", lambda s, f: _use_instruction(s, np.ones((2, 3), "float32")), "instruction with shape (2, 3)"),
    ("use_instruction width 5", "enabled", lambda s, f: _use_instruction(s, np.ones((5,), "float32")), "instruction with shape (1, 5)"),
    ("use_instruction no prior", "enabled_no_prior", lambda s, f: _use_instruction(s, np.ones((3,), "float32")), "model='llama_backbone"),
    ("use_instruction a str", "enabled", lambda s, f: _use_instruction(s, "sort the list"), "instruction='sort the list'"),
    ("InstructedModel key int", "lm", lambda s, f: keras_qlora.InstructedModel(s, instruction_key=3), "instruction_key=3"),
    ("InstructedModel of a base model", "backbone", lambda s, f: keras_qlora.InstructedModel(s), "model='llama_backbone"),
    ("InstructedModel input without instruction", "lm", lambda s, f: keras_qlora.InstructedModel(s)(_ids()), "keys ['padding_mask', 'token_ids']"),
    ("embed no texts", "lm", lambda s, f: keras_qlora.embed_instructions([], s), "texts=[]"),
    ("embed ints", "lm", lambda s, f: keras_qlora.embed_instructions([1, 2], s), "texts=[1, 2]"),
    ("embed without tokenizer", "lm", lambda s, f: keras_qlora.embed_instructions(["sort"], s), "tokenizer=None"),
    ("embed with a str model", "none", lambda s, f: keras_qlora.embed_instructions(["sort"], "bert"), "model='bert'"),
    # disable_adapter, quantize
    ("disable a base model", "backbone", lambda s, f: _disable(s), "model='llama_backbone"),
    ("disable an int", "none", lambda s, f: _disable(3), "model=3"),
    ("quantize adapted float8", "adapted", lambda s, f: s.quantize("float8"), "mode='float8'"),
    ("quantize adapted unknown mode", "adapted", lambda s, f: s.quantize("int2"), "mode=int2"),
]


def _case_id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


def _state(subject):
    if not isinstance(subject, keras.layers.Layer):
        return None
    layers = subject._flatten_layers(include_self=True)
    return {
        "classes": [type(l) for l in layers],
        "weights": [(w.path, w.dtype, w.trainable, to_numpy(w)) for w in subject.weights],
        "memory": [keras_qlora.get_memory(subject), keras_qlora.get_memory(getattr(subject, "backbone", None))],
    }


def _assert_same_state(after, before):
    if before is None:
        return
    assert after["classes"] == before["classes"]
    assert [w[:3] for w in after["weights"]] == [w[:3] for w in before["weights"]]
    for (path, _, _, got), (_, _, _, expected) in zip(after["weights"], before["weights"]):
        np.testing.assert_array_equal(got, expected, err_msg=path)
    assert all(a is b for a, b in zip(after["memory"], before["memory"]))


def test_the_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,subject,call,received", CASES, ids=[_case_id(c) for c in CASES])
def test_a_bad_input_names_itself_and_changes_nothing(name, subject, call, received, adapter_file):
    subject = _subject(subject)
    before = _state(subject)
    with pytest.raises((ValueError, TypeError)) as error:
        call(subject, adapter_file)
    message = str(error.value)
    assert received in message, message
    _assert_same_state(_state(subject), before)
