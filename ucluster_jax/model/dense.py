"""Dense layers with a hand-written gradient: the same maths as `x @ w`, but faster on XLA's CPU backend.

For the 1x1 convolutions of ABCNet (x [B,N,C] @ w [C,F]) autodiff's transposed dot made XLA write the
incoming gradient out a second time, in transposed layout, for the weight gradient (~210 ms per
step at batch 512 on the development CPU); stated as two plain matmuls on the flattened points,
the backward pass needs no such copy (docs/BENCHMARKS.md). Values and gradients are unchanged.
"""
from __future__ import annotations

import jax
import flax.linen as nn

Array = jax.Array
glorot = nn.initializers.glorot_uniform()


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
    """x [..., C] @ w [C, F]."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def matmul_grads(x: Array, w: Array, g: Array) -> tuple[Array, Array]:
    """(dx, dw) of x @ w for the incoming gradient g, as two plain matmuls on the flattened points."""
    return g @ w.T, x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])


matmul.defvjp(_matmul_fwd, lambda res, g: matmul_grads(*res, g))


class Dense(nn.Module):
    """`flax.linen.Dense` on the last axis (same parameter names, order and initial values), using `matmul`."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", glorot, (x.shape[-1], self.features))
        y = matmul(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y
