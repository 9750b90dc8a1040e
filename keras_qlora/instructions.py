"""Instructions for the prior: embedding them, and getting them to the routing.

Three ways to hand an instruction embedding to the routing, by use:

* `use_instruction(model, e)`: one instruction for every call inside the
  block, stored in variables, so it reaches compiled functions such as
  KerasHub's cached `generate`.
* `InstructedModel(model)`: a wrapper taking an extra `"instruction"` input,
  so each example of a `fit` batch has its own instruction.
* `layer(x, instruction=e)` or `memory.use_instruction(e)` for models built
  from the layers.

`embed_instructions` turns instruction text into embeddings with the base
model's own frozen token embeddings (mean-pooled) or a KerasHub
`TextEmbedder`.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_qlora.retrofit import find_memory


def _prior_of(model):
    memory = find_memory(model)
    if memory.prior is None:
        raise ValueError(
            "`model` has no `InstructionPrior`; pass `prior=keras_qlora.InstructionPrior(...)` "
            f"to `enable` (or to `AtomMemory`). Received: model={getattr(model, 'name', model)!r}"
        )
    return memory


@contextlib.contextmanager
def use_instruction(model, instruction):
    """Routes every call of `model` inside the block with one instruction.

    The embedding (`(embedding_dim,)` or `(1, embedding_dim)`) is stored in
    the prior's variables, so compiled functions (`predict`, KerasHub's
    cached `generate`) read the current one: two blocks with different
    instructions route differently on every backend, without retracing. It
    is model-wide (all threads), and the previous instruction returns on
    exit. Per-example instructions go through `InstructedModel` or the
    layers' `instruction=` argument, which take precedence.

    Example:

    ```python
    e = keras_qlora.embed_instructions("Reverse the word.", lm)
    with keras_qlora.use_instruction(lm, e):
        print(lm.generate("stressed ->"))
    ```
    """
    prior = _prior_of(model).prior
    previous = (
        ops.convert_to_numpy(prior.stored_instruction),
        ops.convert_to_numpy(prior.stored_gate),
    )
    prior.set_instruction(instruction)
    try:
        yield
    finally:
        prior.stored_instruction.assign(previous[0])
        prior.stored_gate.assign(previous[1])


@keras.saving.register_keras_serializable(package="keras_qlora")
class InstructedModel(keras.Model):
    """A model whose inputs carry one instruction embedding per example.

    Wraps a model with Queryable LoRA adapters (a KerasHub task after
    `keras_qlora.enable(task.backbone, prior=...)`, or any model built from
    the layers). Its inputs are the wrapped model's input dict plus an
    `instruction_key` entry of shape `(batch, embedding_dim)`; each example
    is routed with its own instruction. It trains with the usual `compile`
    and `fit`; the data must already be preprocessed (the wrapper does not
    run the task's preprocessor), and the loss is given to `compile`.

    Args:
        model: the adapted model to wrap.
        instruction_key: str. Name of the instruction input. Defaults to
            `"instruction"`.
        **kwargs: base `Model` arguments (`name`, ...).

    Example:

    ```python
    model = keras_qlora.InstructedModel(lm)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    x = {"token_ids": ids, "padding_mask": mask, "instruction": embeddings}
    model.fit(x, labels, sample_weight=answer_mask)
    model.generate(prompts, instruction=embeddings[0])
    ```
    """

    def __init__(self, model, instruction_key="instruction", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(instruction_key, str):
            raise ValueError(
                f"`instruction_key` must be a str. Received: instruction_key={instruction_key!r}"
            )
        _prior_of(model)
        self.model = model
        self.instruction_key = instruction_key

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict) or self.instruction_key not in inputs:
            raise ValueError(
                f"`InstructedModel` inputs must be a dict with an "
                f"'{self.instruction_key}' entry. Received: inputs of type "
                f"{type(inputs).__name__}"
                + (f" with keys {sorted(inputs)}" if isinstance(inputs, dict) else "")
            )
        inputs = dict(inputs)
        instruction = ops.cast(inputs.pop(self.instruction_key), "float32")
        with find_memory(self.model).use_instruction(instruction):
            return self.model(inputs, training=training)

    def generate(self, inputs, instruction, **kwargs):
        """The wrapped task's `generate`, routed with one `instruction`."""
        with use_instruction(self.model, instruction):
            return self.model.generate(inputs, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "instruction_key": self.instruction_key,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def _token_lists(ids):
    if hasattr(ids, "to_list"):  # tf.RaggedTensor
        ids = ids.to_list()
    elif hasattr(ids, "numpy"):
        ids = ids.numpy().tolist()
    elif isinstance(ids, np.ndarray):
        ids = ids.tolist()
    return [list(np.asarray(row).reshape(-1)) for row in ids]


def embed_instructions(texts, model, tokenizer=None):
    """Instruction embeddings for the prior, one row per text.

    Two sources, chosen by `model`:

    * a KerasHub `TextEmbedder` (for example `BertTextEmbedder`): its
      sentence embedding (`encode_text`);
    * any other model with a token embedding table (a KerasHub backbone or
      task, usually the model being tuned): the mean of the table's rows for
      the instruction's tokens. No extra model is needed; the prior is
      induced by the language the model already knows. The table is frozen
      and read as is (no scaling, no position information).

    Args:
        texts: str or list of str.
        model: a `TextEmbedder`, or a backbone / task with `token_embedding`.
        tokenizer: the tokenizer for mean pooling. Defaults to
            `model.preprocessor.tokenizer`.

    Returns:
        A float32 NumPy array `(len(texts), embedding_dim)`; pass
        `embedding_dim` to `keras_qlora.InstructionPrior`.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"`texts` must be a str or a non-empty list of str. Received: texts={texts!r}")
    texts = list(texts)
    try:
        import keras_hub

        if isinstance(model, keras_hub.models.TextEmbedder):
            return np.asarray(model.encode_text(texts, verbose=0), dtype="float32")
    except ImportError:
        pass
    backbone = getattr(model, "backbone", model)
    table = getattr(backbone, "token_embedding", None)
    if not isinstance(table, keras.layers.Layer):
        raise ValueError(
            "`model` must be a KerasHub `TextEmbedder` or have a `token_embedding` "
            f"layer (a KerasHub backbone or task). Received: model={getattr(model, 'name', model)!r}"
        )
    if tokenizer is None:
        tokenizer = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
    if not callable(tokenizer):
        raise ValueError(
            "Mean-pooled token embeddings need a tokenizer: pass `tokenizer=` "
            "(for example `task.preprocessor.tokenizer`). Received: tokenizer=None"
        )
    rows = []
    for text, ids in zip(texts, _token_lists(tokenizer(texts))):
        if not ids:
            raise ValueError(f"An instruction has no tokens. Received: text={text!r}")
        vectors = table(np.asarray([ids], dtype="int32"))
        rows.append(ops.convert_to_numpy(ops.cast(ops.mean(vectors[0], axis=0), "float32")))
    return np.stack(rows)
