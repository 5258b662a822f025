"""Dense layers with a hand-written gradient: the same maths as `x @ w`, but faster on XLA's CPU backend.

For the 1x1 convolutions of ABCNet (x [B,N,C] @ w [C,F]) autodiff's transposed dot made XLA write the
incoming gradient out a second time, in transposed layout, for the weight gradient (~210 ms per
step at batch 512 on the development CPU); stated as two plain matmuls on the flattened points,
the backward pass needs no such copy (docs/BENCHMARKS.md). Values and gradients are unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array
glorot = nn.initializers.glorot_uniform()


def dot(x: Array, w: Array, dtype: Any = None) -> Array:
    """x [..., C] @ w [C, F]; with a compute `dtype` (bfloat16) the operands in it, the sums in float32."""
    if dtype is None:
        return x @ w
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, w: Array, dtype: Any = None) -> Array:
    """x [..., C] @ w [C, F] (`dot`)."""
    return dot(x, w, dtype)


def _matmul_fwd(x, w, dtype):
    return dot(x, w, dtype), (x, w)


def matmul_grads(x: Array, w: Array, g: Array, dtype: Any = None) -> tuple[Array, Array]:
    """(dx, dw) of x @ w for the incoming gradient g, as two plain matmuls on the flattened points."""
    return dot(g, w.T, dtype), dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]), dtype)


matmul.defvjp(_matmul_fwd, lambda dtype, res, g: matmul_grads(*res, g, dtype))


class Dense(nn.Module):
    """`flax.linen.Dense` on the last axis (same parameter names, order and initial values), using `matmul`."""

    features: int
    use_bias: bool = True
    dtype: Any = None  # compute dtype of the matmul (None: the inputs')

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", glorot, (x.shape[-1], self.features))
        y = matmul(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y
