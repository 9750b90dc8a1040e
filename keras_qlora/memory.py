"""`AtomMemory`: the update atoms, keys and depth summary shared by all layers.

Per-pass routing state
----------------------
The summary that block `b` reads is built from what blocks `0 .. b-1` read in
the *same* forward pass, yet the adapted layers are called one by one by
model code that knows nothing of them (a KerasHub backbone, its cached
generation loop). So the memory keeps a small per-pass state and the layers
report to it as they run:

* The state lives in a `threading.local`: concurrent calls from two threads
  each see their own pass, and a trace (`tf.function`, `jax.jit`,
  `torch` eager) keeps its tensors to itself because tracing runs in the
  calling thread.
* A layer *starts a new pass* when it finds itself already seen in the
  current pass, or when its block is lower than the current one. A forward
  pass calls the adapted layers in depth order, so the first adapted layer of
  every pass triggers the reset: nothing leaks from one pass into the next,
  two calls in a row give identical results, and each step of KerasHub's
  cached generation loop (which calls the transformer blocks one by one) is
  routed exactly like a full forward pass.
* Entering a higher block closes the previous one: its read (the mean of its
  routing reads) is appended to the list the next summaries attend over.

Known limit: a layer called twice in one pass (weight tying across depths, or
rematerialization re-running a block) is taken as the start of a new pass, so
the layers after it see a fresh summary. `tests/test_memory.py` documents this.
"""

import collections
import contextlib
import math
import threading

import keras
from keras import ops

from keras_qlora import routing
from keras_qlora._validation import check_choice, check_non_negative, check_positive_int
from keras_qlora.prior import InstructionPrior, add_state_variable, load_weights_only, save_weights_only

SUMMARY_MODES = ("attention", "ema", "none")
ROUTING_MODES = ("block", "layer")


@keras.saving.register_keras_serializable(package="keras_qlora")
class IdentityNoise(keras.initializers.Initializer):
    """Initializes `(M, r, r)` atoms as `I + N(0, stddev²)`."""

    def __init__(self, stddev=0.02, seed=None):
        self.stddev = stddev
        self.seed = seed
        self._noise = keras.initializers.RandomNormal(stddev=stddev, seed=seed)

    def __call__(self, shape, dtype=None):
        return ops.eye(shape[-1], dtype=dtype) + self._noise(shape, dtype=dtype)

    def get_config(self):
        return {"stddev": self.stddev, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_qlora")
class OrthogonalAtoms(keras.initializers.Initializer):
    """Initializes each `r x r` atom as an independent random orthogonal matrix."""

    def __init__(self, seed=None):
        self.seed = seed
        self._normal = keras.initializers.RandomNormal(stddev=1.0, seed=seed)

    def __call__(self, shape, dtype=None):
        q, r = ops.qr(self._normal(shape, dtype="float32"))
        signs = ops.sign(ops.diagonal(r, axis1=-2, axis2=-1))
        return ops.cast(q * ops.expand_dims(signs, -2), dtype or "float32")

    def get_config(self):
        return {"seed": self.seed}


def _outside_torch_compile(method):
    """Runs `method` eagerly inside `torch.compile` (TorchDynamo).

    Dynamo does not replay the pass state's mutations within one trace: under
    `jit_compile=True` a later block read the state as it was before the
    trace began and routed wrongly. A graph break here keeps it correct.
    """
    if keras.backend.backend() != "torch":
        return method
    import torch

    return torch.compiler.disable(method)


Routing = collections.namedtuple("Routing", ["alpha", "read", "logits", "log_prior"])

ATOM_INITIALIZERS = {"identity": IdentityNoise, "orthogonal": OrthogonalAtoms}


class _PassState(threading.local):
    """What one thread knows about its current forward pass."""

    def __init__(self):
        self.instructions = []
        self.captures = []
        self.reset()

    def reset(self):
        self.block = -1
        self.seen = set()
        self.finished_reads = []
        self.block_reads = []
        # The current block's routing decision: `(Selection, gated weights,
        # gathered atoms)`.
        self.decision = None
        self.summary = None
        # The depth summary folded over `finished_reads[:folded]`.
        self.summary_state = None
        self.folded = 0

    def enter(self, caller, block):
        if id(caller) in self.seen or block < self.block:
            self.reset()
        if block > self.block:
            if self.block_reads:
                self.finished_reads.append(_mean(self.block_reads))
            self.block = block
            self.block_reads = []
            self.decision = None
            self.summary = None
        self.seen.add(id(caller))


def _mean(tensors):
    if len(tensors) == 1:
        return tensors[0]
    return ops.mean(ops.stack(tensors, axis=0), axis=0)


@keras.saving.register_keras_serializable(package="keras_qlora")
class AtomMemory(keras.layers.Layer):
    """The shared, queryable memory of low-rank update atoms.

    Follows Queryable LoRA (arXiv 2605.08423) as this project defines it
    (the paper's equations were not published in reach; see `METHOD.md`).
    Every adapted layer of a model shares one memory. For each block of
    layers, a query built from the low-rank state `z = x A` and a running
    summary of the previous blocks attends over the atom keys; the softmax
    over the `top_k` best logits mixes the `r x r` atoms into the routed
    operator `R` that acts inside the bottleneck: `y = f(x) + s (z R) B`.

    Routing runs in float32 under every dtype policy and per position: it
    never mixes positions. The module docstring explains how the per-pass
    routing state works.

    Args:
        num_atoms: int. Number `M` of atoms.
        rank: int. Rank `r` of the adapters that use this memory.
        top_k: int. Atoms mixed per position; `num_atoms` gives a dense
            softmax. Defaults to `2`.
        key_dim: int. Width `d_k` of queries and keys. Defaults to `32`.
        summary_dim: int. Width `d_s` of the running summary. Defaults to `32`.
        num_blocks: int. Number of blocks of layers. Defaults to `1`.
        summary: str. How a block summarizes the previous blocks' reads:
            `"attention"` (attention over depth), `"ema"` (moving average)
            or `"none"` (no summary; an ablation). Defaults to `"attention"`.
        routing: str. `"block"`: the first adapted layer of a block routes
            and the block's other layers reuse its weights; `"layer"`: every
            layer routes on its own state. Defaults to `"block"`.
        temperature: float. Divides the query-key logits. Defaults to `1.0`.
        summary_momentum: float in `[0, 1)`. `mu` of the `"ema"` summary.
            Defaults to `0.9`.
        atom_initializer: `"identity"` (identity plus `N(0, 0.02²)` noise,
            so the adapter starts as plain LoRA), `"orthogonal"`, or a
            `keras.initializers.Initializer`. Defaults to `"identity"`.
        prior: an `InstructionPrior` or `None`. Defaults to `None`.
        **kwargs: base `Layer` arguments (`name`, ...).

    Example:

    ```python
    memory = keras_qlora.AtomMemory(num_atoms=16, rank=4, num_blocks=2)
    inputs = keras.Input((32,))
    h = keras_qlora.QueryableLoRADense(64, memory=memory, block=0)(inputs)
    outputs = keras_qlora.QueryableLoRADense(1, memory=memory, block=1)(h)
    model = keras.Model(inputs, outputs)
    ```
    """

    def __init__(
        self,
        num_atoms,
        rank,
        top_k=2,
        key_dim=32,
        summary_dim=32,
        num_blocks=1,
        summary="attention",
        routing="block",
        temperature=1.0,
        summary_momentum=0.9,
        atom_initializer="identity",
        prior=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        for name, value in (
            ("num_atoms", num_atoms),
            ("rank", rank),
            ("top_k", top_k),
            ("key_dim", key_dim),
            ("summary_dim", summary_dim),
            ("num_blocks", num_blocks),
        ):
            check_positive_int(name, value)
        if top_k > num_atoms:
            raise ValueError(
                "`top_k` cannot exceed `num_atoms`. "
                f"Received: top_k={top_k}, num_atoms={num_atoms}"
            )
        check_choice("summary", summary, SUMMARY_MODES)
        check_choice("routing", routing, ROUTING_MODES)
        check_non_negative("temperature", temperature, strictly=True)
        check_non_negative("summary_momentum", summary_momentum)
        if summary_momentum >= 1:
            raise ValueError(
                "`summary_momentum` must be in [0, 1). "
                f"Received: summary_momentum={summary_momentum!r}"
            )
        if isinstance(atom_initializer, str):
            check_choice("atom_initializer", atom_initializer, tuple(ATOM_INITIALIZERS))
            atom_initializer = ATOM_INITIALIZERS[atom_initializer]()
        elif isinstance(atom_initializer, dict):
            atom_initializer = keras.initializers.deserialize(atom_initializer)
        if not callable(atom_initializer):
            raise ValueError(
                "`atom_initializer` must be 'identity', 'orthogonal' or an "
                f"initializer. Received: atom_initializer={atom_initializer!r}"
            )
        if isinstance(prior, dict):
            prior = keras.saving.deserialize_keras_object(prior)
        if prior is not None and not isinstance(prior, InstructionPrior):
            raise ValueError(
                "`prior` must be an `InstructionPrior` or None. "
                f"Received: prior={prior!r}"
            )
        self.num_atoms = num_atoms
        self.rank = rank
        self.top_k = top_k
        self.key_dim = key_dim
        self.summary_dim = summary_dim
        self.num_blocks = num_blocks
        self.summary = summary
        self.routing = routing
        self.temperature = float(temperature)
        self.summary_momentum = float(summary_momentum)
        self.atom_initializer = atom_initializer
        if prior is not None:
            for name in ("num_atoms", "key_dim"):
                given = getattr(prior, name)
                if given is not None and given != getattr(self, name):
                    raise ValueError(
                        f"The prior's `{name}` ({given}) differs from the "
                        f"memory's. Received: {name}={getattr(self, name)}"
                    )
            prior.num_atoms, prior.key_dim = num_atoms, key_dim
        self.prior = prior
        # Bypasses Keras's attribute tracking: thread-local, never saved.
        object.__setattr__(self, "_pass", _PassState())
        self.build()

    def _add(self, name, shape, initializer):
        return self.add_weight(
            name=name, shape=shape, initializer=initializer, dtype="float32", autocast=False
        )

    def build(self, input_shape=None):
        m, r, dk, ds = self.num_atoms, self.rank, self.key_dim, self.summary_dim
        normal = keras.initializers.RandomNormal
        self.atoms = self._add("atoms", (m, r, r), self.atom_initializer)
        self.keys = self._add("keys", (m, dk), normal(stddev=1.0))
        self.query_kernel = self._add("query_kernel", (r + ds, dk), "glorot_uniform")
        self.block_embeddings = self._add("block_embeddings", (self.num_blocks, dk), normal(stddev=0.02))
        self.summary_init = self._add("summary_init", (ds,), "zeros")
        self.atom_values = None
        self.depth_query = None
        if self.summary != "none":
            self.atom_values = self._add("atom_values", (m, ds), normal(stddev=1.0))
        if self.summary == "attention":
            self.depth_query = self._add("depth_query", (ds,), "zeros")
        # Runtime state, not a weight (never saved): 0 while the adapters are
        # off (`keras_qlora.disable_adapter`). A variable, not a Python flag,
        # so compiled functions (KerasHub's cached `generate`) see changes.
        self.adapter_gate = add_state_variable(self, "adapter_gate", (), "ones")
        if self.prior is not None and not self.prior.built:
            self.prior.build()
        self.built = True

    # -- routing -----------------------------------------------------------

    def summarize(self, reads):
        """The summary `s_b` a block sees, given the reads of earlier blocks.

        Args:
            reads: list of `(..., summary_dim)` float32 tensors, the reads
                `v_j` of the blocks that ran before, in depth order.
        """
        state = None
        for read in reads:
            state = self._fold(state, read)
        return self._summary_of(state)

    def _fold(self, state, read):
        # Folds one more finished read into the running depth summary: each
        # read is folded once per pass, so the cost per block is constant.
        if self.summary == "attention":
            return routing.attention_fold(state, read, self.depth_query)
        if self.summary == "ema":
            previous = self.summary_init if state is None else state
            return routing.ema_fold(previous, read, self.summary_momentum)
        return None

    def _summary_of(self, state):
        if self.summary == "attention":
            return routing.attention_value(state, self.summary_init)
        return self.summary_init if state is None else state

    def _current_summary(self, state):
        while state.folded < len(state.finished_reads):
            state.summary_state = self._fold(state.summary_state, state.finished_reads[state.folded])
            state.folded += 1
        return self._summary_of(state.summary_state)

    def route(self, z, block, summary=None, instruction=None, instruction_gate=None):
        """Routing weights of one block for the low-rank state `z`.

        Args:
            z: `(..., rank)` low-rank state `x A`.
            block: int. The block index.
            summary: `(..., summary_dim)` or `(summary_dim,)` summary `s_b`;
                `None` uses the initial summary `s_0`.
            instruction: `(batch, embedding_dim)` instruction embedding for
                the prior, or `None`.
            instruction_gate: `None`, or a float32 scalar multiplying the
                instruction's terms (`0` removes them exactly).

        Returns:
            A `Routing` of float32 tensors: `alpha`, the routing weights
            `(..., num_atoms)` (top-k softmax); `read`, `alpha V`
            `(..., summary_dim)` (`None` with `summary="none"`); `logits`,
            the full logits `(..., num_atoms)`; and `log_prior`, the prior's
            `(batch, num_atoms)` `log pi` (`None` without an instruction).
        """
        selection, read, logits, log_prior = self._select(z, block, summary, instruction, instruction_gate)
        return Routing(selection.dense(), read, logits, log_prior)

    def _select(self, z, block, summary, instruction, instruction_gate):
        # `route`, with the weights kept sparse (a `routing.Selection`).
        self.check_block(block)
        z = ops.cast(z, "float32")
        if summary is None:
            summary = self.summary_init
        r = self.rank
        # `@` on backend tensors: the same matmul as `ops.matmul`, without
        # its per-call dispatch work, which dominates eager generation steps.
        # Everything here is float32 and at least 2-D, except a 1-D summary.
        kernel = ops.convert_to_tensor(self.query_kernel)
        query = routing.rms_norm(z) @ kernel[:r] + ops.matmul(summary, kernel[r:]) + self.block_embeddings[block]
        log_prior = None
        if instruction is not None:
            self.check_instruction(instruction)
            if self.prior.instruction_in_query:
                bias = self.prior.query_bias(instruction)
                if instruction_gate is not None:
                    bias = bias * instruction_gate
                query = query + routing.expand_to_positions(bias, z)
            log_prior = self.prior.call(instruction)
            if instruction_gate is not None:
                log_prior = log_prior * instruction_gate
        logits = (query @ ops.transpose(self.keys)) * (1.0 / (self.temperature * math.sqrt(self.key_dim)))
        if log_prior is not None and self.prior.prior_strength > 0:
            logits = logits + self.prior.prior_strength * routing.expand_to_positions(log_prior, z)
        selection = routing.select_atoms(logits, self.top_k)
        read = None if self.atom_values is None else selection.combine(self.atom_values)
        return selection, read, logits, log_prior

    def check_instruction(self, instruction):
        """Raises a `ValueError` unless this memory can use `instruction`."""
        if self.prior is None:
            raise ValueError(
                "An instruction was given but this memory has no "
                "`InstructionPrior`; create it with "
                "`AtomMemory(prior=InstructionPrior(...))`. Received: "
                f"instruction with shape {tuple(instruction.shape)}"
            )
        self.prior.check_instruction(instruction)

    def check_block(self, block):
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(
                f"`block` must be an integer in [0, {self.num_blocks}) for a "
                f"memory with num_blocks={self.num_blocks}. Received: block={block!r}"
            )

    @_outside_torch_compile
    def routed_update(self, z, block, caller, instruction=None):
        """`R z` for one adapted layer's call, inside the current pass.

        Called by the adapted layers; see the module docstring for the pass
        protocol. Returns `(routed, kl_loss)`: the float32 `(..., rank)`
        tensor `R z` and the prior's KL regularizer for this routing
        decision (`None` when it is off or this layer reused its block's
        routing).
        """
        state = self._pass
        gate = None
        if instruction is None and state.instructions:
            instruction = state.instructions[-1]
        elif instruction is None and self.prior is not None:
            # The model-wide instruction of `keras_qlora.use_instruction`;
            # its gate is 0 (an exact no-op) when none is set.
            instruction, gate = self.prior.stored_instruction, self.prior.stored_gate
        state.enter(caller, block)
        z = ops.cast(z, "float32")
        kl_loss = None
        if self.routing == "block" and state.decision is not None:
            selection, weights, gathered = state.decision
        else:
            if state.summary is None:
                state.summary = self._current_summary(state)
            selection, read, logits, log_prior = self._select(z, block, state.summary, instruction, gate)
            # The k selected atoms are gathered once per decision; every layer
            # reusing it mixes them with its own z (k r² per position).
            gathered = routing.gather_atoms(selection, self.atoms)
            weights = selection.weights * self.adapter_gate
            state.decision = (selection, weights, gathered)
            if read is not None:
                state.block_reads.append(read)
            if log_prior is not None and self.prior.prior_kl_weight > 0:
                kl_loss = self.prior.prior_kl_weight * routing.kl_to_routing(log_prior, logits)
                if gate is not None:
                    kl_loss = kl_loss * gate
        for capture in state.captures:
            capture.append(
                {"block": block, "layer": getattr(caller, "name", None), "caller": caller, "alpha": selection.dense()}
            )
        return routing.apply_atoms(selection, weights, z, gathered), kl_loss

    def reset_pass(self):
        """Forgets the current thread's pass; the next layer call starts one."""
        self._pass.reset()

    @contextlib.contextmanager
    def use_instruction(self, instruction):
        """Routes every call in this block (this thread) with `instruction`.

        Layers called with an explicit `instruction=` argument use that
        instead.
        """
        self.check_instruction(instruction)
        self._pass.instructions.append(instruction)
        try:
            yield
        finally:
            self._pass.instructions.pop()

    @contextlib.contextmanager
    def capture_routing(self):
        """Records every routing decision made in this block (this thread).

        Yields a list that receives one dict per adapted-layer call:
        `{"block", "layer", "caller", "alpha"}` (`layer` is the name, `caller`
        the layer itself). Meant for eager inspection (plots of
        atom usage); under a trace it holds symbolic tensors.
        """
        records = []
        self._pass.captures.append(records)
        try:
            yield records
        finally:
            self._pass.captures.remove(records)

    # -- bookkeeping -------------------------------------------------------

    def save_own_variables(self, store):
        save_weights_only(self, store)

    def load_own_variables(self, store):
        load_weights_only(self, store)

    def get_config(self):
        return {
            **super().get_config(),
            "num_atoms": self.num_atoms,
            "rank": self.rank,
            "top_k": self.top_k,
            "key_dim": self.key_dim,
            "summary_dim": self.summary_dim,
            "num_blocks": self.num_blocks,
            "summary": self.summary,
            "routing": self.routing,
            "temperature": self.temperature,
            "summary_momentum": self.summary_momentum,
            "atom_initializer": keras.initializers.serialize(self.atom_initializer),
            "prior": None if self.prior is None else keras.saving.serialize_keras_object(self.prior),
        }
