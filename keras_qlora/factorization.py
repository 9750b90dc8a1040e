"""How a frozen `Dense` or `EinsumDense` kernel splits into `A` and `B`.

A kernel's axes are either *input axes* (contracted with the input) or
*output axes* (appear in the output, not in the input). The adapter treats the
kernel as the matrix `(prod(input axes), prod(output axes))` and factors its
update as `A: input_axes + (r,)` and `B: (r,) + output_axes`, the PEFT
convention. Keras's own `EinsumDense.enable_lora` instead keeps every kernel
axis but the last in `A`; `keras_lora_size` gives that count for comparisons.
"""

import dataclasses
import math
import string

import keras


@dataclasses.dataclass(frozen=True)
class Factorization:
    """Einsum equations and shapes of the low-rank pair of one layer.

    `down_equation` maps the input to the low-rank state `z` of shape
    `positions + (r,)`, `up_equation` maps `z` to the layer's output layout,
    and `base_equation` is the frozen map itself.
    """

    base_equation: str
    down_equation: str
    up_equation: str
    a_shape: tuple
    b_shape: tuple
    kernel_shape: tuple

    @property
    def rank(self):
        return self.a_shape[-1]

    @property
    def lora_size(self):
        """Parameters of a plain LoRA of this rank (PEFT convention)."""
        return self.rank * (math.prod(self.a_shape[:-1]) + math.prod(self.b_shape[1:]))

    @property
    def kernel_update_equation(self):
        """Einsum `A, R, B -> update` with the kernel's axis order."""
        inp, ker = self.base_equation.split("->")[0].split(",")
        inp = inp.replace("...", "")
        contracted = "".join(c for c in ker if c in inp)
        produced = "".join(c for c in ker if c not in inp)
        r = _free_letter(set(self.base_equation))
        q = _free_letter(set(self.base_equation) | {r})
        return f"{contracted}{r},{r}{q},{q}{produced}->{ker}"

    @property
    def keras_lora_size(self):
        """Parameters of Keras's `enable_lora` at this rank."""
        return self.rank * (math.prod(self.kernel_shape[:-1]) + self.kernel_shape[-1])


def _free_letter(used):
    for letter in string.ascii_letters:
        if letter not in used:
            return letter
    raise ValueError(f"No free einsum letter left beside {sorted(used)}.")


def factorize_equation(equation, kernel_shape, rank):
    """Factorizes an `EinsumDense` equation into a rank-`rank` pair.

    Args:
        equation: str. The layer's einsum equation, such as `"abc,cde->abde"`
            or `"...b,bc->...c"`.
        kernel_shape: tuple of int. The shape of the layer's kernel.
        rank: int. The rank `r` of the factorization.

    Returns:
        A `Factorization`.

    Raises:
        ValueError: if a kernel axis is neither contracted with the input nor
            only in the output (a batch-like or summed-away kernel axis), or
            if the equation has an ellipsis anywhere but at the left.
    """
    compact = equation.replace(" ", "")
    try:
        lhs, out = compact.split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        raise ValueError(
            "`equation` must have the form 'input,kernel->output'. "
            f"Received: equation={equation!r}"
        ) from None
    if "..." in ker or any("..." in s and not s.startswith("...") for s in (inp, out)):
        raise ValueError(
            "Queryable LoRA supports an ellipsis only at the left of the input "
            f"and output specs. Received: equation={equation!r}"
        )
    inp_letters = inp.replace("...", "")
    out_letters = out.replace("...", "")
    if len(ker) != len(kernel_shape):
        raise ValueError(
            f"`equation` names {len(ker)} kernel axes but the kernel has shape "
            f"{tuple(kernel_shape)}. Received: equation={equation!r}"
        )
    batch_like = [c for c in ker if c in inp_letters and c in out_letters]
    summed_away = [c for c in ker if c not in inp_letters and c not in out_letters]
    if batch_like or summed_away:
        raise ValueError(
            "Cannot factorize this einsum kernel into input and output axes: "
            f"kernel axes {batch_like + summed_away} are "
            + ("both in the input and in the output" if batch_like else "in neither")
            + f". Received: equation={equation!r}"
        )
    contracted = "".join(c for c in ker if c in inp_letters)
    produced = "".join(c for c in ker if c in out_letters)
    if not contracted or not produced:
        raise ValueError(
            "Cannot factorize an einsum kernel without both input and output "
            f"axes. Received: equation={equation!r}"
        )
    r = _free_letter(set(compact))
    ellipsis = "..." if inp.startswith("...") else ""
    positions = ellipsis + "".join(c for c in inp_letters if c not in contracted)
    dims = dict(zip(ker, kernel_shape))
    return Factorization(
        base_equation=compact,
        down_equation=f"{inp},{contracted}{r}->{positions}{r}",
        up_equation=f"{positions}{r},{r}{produced}->{out}",
        a_shape=tuple(dims[c] for c in contracted) + (rank,),
        b_shape=(rank,) + tuple(dims[c] for c in produced),
        kernel_shape=tuple(kernel_shape),
    )


def factorize_layer(layer, rank):
    """Factorization of a built `keras.layers.Dense` or `EinsumDense`."""
    if isinstance(layer, keras.layers.EinsumDense):
        shape = getattr(layer, "original_kernel_shape", None) or layer.kernel.shape
        return factorize_equation(layer.equation, tuple(shape), rank)
    if isinstance(layer, keras.layers.Dense):
        shape = getattr(layer, "original_kernel_shape", None) or layer.kernel.shape
        return factorize_equation("...i,io->...o", tuple(shape), rank)
    raise TypeError(
        "Queryable LoRA adapts `keras.layers.Dense` and "
        f"`keras.layers.EinsumDense` layers. Received: layer={layer!r} "
        f"of type {type(layer).__name__}"
    )
