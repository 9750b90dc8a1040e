"""`InstructionPrior`: a language-derived distribution over the atoms."""

import keras
from keras import ops

from keras_qlora._validation import check_non_negative, check_positive_int


def add_state_variable(layer, name, shape, initializer):
    """A non-trainable float32 variable holding runtime state, not a weight.

    State variables are left out of saved files and parameter counts; they
    are variables (not Python attributes) so that compiled functions read
    their current value.
    """
    variable = layer.add_weight(
        name=name, shape=shape, initializer=initializer, dtype="float32",
        trainable=False, autocast=False,
    )
    variable._keras_qlora_state = True
    return variable


def is_state_variable(variable):
    return getattr(variable, "_keras_qlora_state", False)


def _saved_weights(layer):
    return [
        v for v in layer._trainable_variables + layer._non_trainable_variables
        if not is_state_variable(v)
    ]


def save_weights_only(layer, store):
    """`Layer.save_own_variables`, leaving the state variables out."""
    for i, variable in enumerate(_saved_weights(layer)):
        store[str(i)] = variable


def load_weights_only(layer, store):
    """Loads what `save_weights_only` saved.

    An empty entry is a checkpoint saved before the adapter existed (the
    base model's): the weights keep their current values.
    """
    if not len(store.keys()):
        return
    weights = _saved_weights(layer)
    if len(store.keys()) != len(weights):
        raise ValueError(
            f"Layer '{layer.name}' expected {len(weights)} variables, but "
            f"received {len(store.keys())} during loading. Expected: "
            f"{[v.name for v in weights]}"
        )
    for i, variable in enumerate(weights):
        variable.assign(store[str(i)])


@keras.saving.register_keras_serializable(package="keras_qlora")
class InstructionPrior(keras.layers.Layer):
    """Turns an instruction embedding into a log-prior over the update atoms.

    Follows the instruction regularization of Queryable LoRA (arXiv
    2605.08423) as this project defines it (the paper's equations were not
    published in reach): `log pi(e) = log_softmax(e W_pi / prior_temperature)`.
    The routing adds `prior_strength * log pi(e)` to its logits, so the
    instruction biases which atoms are selected without generating weights.

    A prior belongs to one `AtomMemory` (pass it as `AtomMemory(prior=...)`),
    which sets `num_atoms` and `key_dim` and calls it during routing. It can
    also be called on its own to inspect the distribution.

    Args:
        embedding_dim: int. Width `d_e` of the instruction embeddings.
        prior_strength: float. Weight `lambda` of the log-prior in the
            routing logits; `0` turns the prior off. Defaults to `1.0`.
        prior_temperature: float. Temperature of the prior's softmax.
            Defaults to `1.0`.
        prior_kl_weight: float. Weight of the regularizer
            `KL(pi || mean over positions of the dense routing probabilities)`,
            added with `add_loss` by every layer that routes. Defaults to `0.0`.
        instruction_in_query: bool. Whether the query also gets `e W_e`.
            Defaults to `False`.
        num_atoms: int or `None`. Set by the owning `AtomMemory`.
        key_dim: int or `None`. Set by the owning `AtomMemory`.
        **kwargs: base `Layer` arguments (`name`, ...).

    Input shape:
        `(batch, embedding_dim)`.

    Output shape:
        `(batch, num_atoms)`: `log pi(e)`, float32.
    """

    def __init__(
        self,
        embedding_dim,
        prior_strength=1.0,
        prior_temperature=1.0,
        prior_kl_weight=0.0,
        instruction_in_query=False,
        num_atoms=None,
        key_dim=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        check_positive_int("embedding_dim", embedding_dim)
        check_non_negative("prior_strength", prior_strength)
        check_non_negative("prior_temperature", prior_temperature, strictly=True)
        check_non_negative("prior_kl_weight", prior_kl_weight)
        if not isinstance(instruction_in_query, bool):
            raise ValueError(
                "`instruction_in_query` must be a bool. "
                f"Received: instruction_in_query={instruction_in_query!r}"
            )
        for name, value in (("num_atoms", num_atoms), ("key_dim", key_dim)):
            if value is not None:
                check_positive_int(name, value)
        self.embedding_dim = embedding_dim
        self.prior_strength = float(prior_strength)
        self.prior_temperature = float(prior_temperature)
        self.prior_kl_weight = float(prior_kl_weight)
        self.instruction_in_query = instruction_in_query
        self.num_atoms = num_atoms
        self.key_dim = key_dim

    def build(self, input_shape=None):
        if self.num_atoms is None or (self.instruction_in_query and self.key_dim is None):
            raise ValueError(
                "`InstructionPrior` needs `num_atoms` (and `key_dim` with "
                "`instruction_in_query=True`) before it is built; pass it to "
                "`AtomMemory(prior=...)`, which sets them. Received: "
                f"num_atoms={self.num_atoms}, key_dim={self.key_dim}"
            )
        self.prior_kernel = self.add_weight(
            name="prior_kernel",
            shape=(self.embedding_dim, self.num_atoms),
            initializer="glorot_uniform",
            dtype="float32",
            autocast=False,
        )
        self.query_kernel = None
        if self.instruction_in_query:
            self.query_kernel = self.add_weight(
                name="query_kernel",
                shape=(self.embedding_dim, self.key_dim),
                initializer="glorot_uniform",
                dtype="float32",
                autocast=False,
            )
        # The model-wide instruction of `keras_qlora.use_instruction`, as
        # variables so a compiled `generate` reads the current one.
        self.stored_instruction = add_state_variable(
            self, "stored_instruction", (1, self.embedding_dim), "zeros"
        )
        self.stored_gate = add_state_variable(self, "stored_gate", (), "zeros")
        self.built = True

    def set_instruction(self, instruction):
        """Makes `instruction` (`(embedding_dim,)` or `(1, embedding_dim)`)
        the model-wide instruction; `None` clears it."""
        if instruction is None:
            self.stored_gate.assign(0.0)
            return
        try:
            instruction = ops.convert_to_tensor(instruction, dtype="float32")
        except (ValueError, TypeError):
            raise ValueError(
                "`instruction` must be an embedding (an array of floats), not "
                "text; embed text with `keras_qlora.embed_instructions`. "
                f"Received: instruction={instruction!r}"
            ) from None
        if len(instruction.shape) == 1:
            instruction = ops.expand_dims(instruction, 0)
        if tuple(instruction.shape) != (1, self.embedding_dim):
            raise ValueError(
                f"A model-wide instruction must have shape ({self.embedding_dim},) "
                f"or (1, {self.embedding_dim}); pass per-example instructions "
                "through `keras_qlora.InstructedModel` or the layers' "
                f"`instruction=` argument. Received: instruction with shape "
                f"{tuple(instruction.shape)}"
            )
        self.stored_instruction.assign(instruction)
        self.stored_gate.assign(1.0)

    def check_instruction(self, instruction):
        """Raises a `ValueError` unless `instruction` is `(batch, embedding_dim)`."""
        shape = tuple(instruction.shape)
        if len(shape) != 2 or shape[-1] not in (None, self.embedding_dim):
            raise ValueError(
                f"`instruction` must have shape (batch, {self.embedding_dim}). "
                f"Received: instruction with shape {shape}"
            )

    def call(self, instruction):
        self.check_instruction(instruction)
        logits = ops.matmul(ops.cast(instruction, "float32"), self.prior_kernel)
        return ops.log_softmax(logits / self.prior_temperature, axis=-1)

    def query_bias(self, instruction):
        """`e W_e`, the instruction's term in the query; `None` if unused."""
        if self.query_kernel is None:
            return None
        return ops.matmul(ops.cast(instruction, "float32"), self.query_kernel)

    def save_own_variables(self, store):
        save_weights_only(self, store)

    def load_own_variables(self, store):
        load_weights_only(self, store)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_atoms)

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "prior_strength": self.prior_strength,
            "prior_temperature": self.prior_temperature,
            "prior_kl_weight": self.prior_kl_weight,
            "instruction_in_query": self.instruction_in_query,
            "num_atoms": self.num_atoms,
            "key_dim": self.key_dim,
        }
