"""The graph attention pooling (GAP) layer of ABCNet, as in the original `attn_feature`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ucluster_jax.model.batchnorm import BatchNorm, ReplicaSum
from ucluster_jax.model.knn import gather_neighbours

Array = jax.Array
glorot = nn.initializers.glorot_uniform()


class ConvBN(nn.Module):
    """The original's "1x1 conv": Dense on the last axis, BatchNorm, ReLU."""

    features: int
    use_bias: bool = True
    bn_epsilon: float = 1e-3
    replica_sum: ReplicaSum | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool, decay: Array | float, mask: Array | None = None) -> Array:
        y = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=glorot, name="dense")(x)
        y = BatchNorm(self.bn_epsilon, self.replica_sum, name="bn")(y, train=train, decay=decay, mask=mask)
        return nn.relu(y)


class GAPLayer(nn.Module):
    """One-head graph attention: returns (attention features [B,N,F], graph features [B,N,F]).

    `edge_per_point` uses W_e(x_i - x_j) + b = W_e x_i - W_e x_j + b: the edge Dense runs once per
    point and the result is gathered, k times fewer FLOPs than the per-edge form (same function).
    """

    features: int
    bn_epsilon: float = 1e-3
    replica_sum: ReplicaSum | None = None
    edge_per_point: bool = True

    @nn.compact
    def __call__(self, x: Array, idx: Array, *, train: bool, decay: Array | float,
                 mask: Array | None = None) -> tuple[Array, Array]:
        bn_kw = dict(bn_epsilon=self.bn_epsilon, replica_sum=self.replica_sum)
        h = ConvBN(self.features, use_bias=False, name="newfea", **bn_kw)(x, train=train, decay=decay, mask=mask)

        w_e = self.param("edge_kernel", glorot, (x.shape[-1], self.features))
        b_e = self.param("edge_bias", nn.initializers.zeros, (self.features,))
        if self.edge_per_point:
            u = x @ w_e
            e = u[:, :, None, :] - gather_neighbours(u, idx) + b_e
        else:
            e = (x[:, :, None, :] - gather_neighbours(x, idx)) @ w_e + b_e
        edge_mask = None if mask is None else jnp.broadcast_to(mask[:, :, None], idx.shape)
        y = nn.relu(BatchNorm(self.bn_epsilon, self.replica_sum, name="edge_bn")(
            e, train=train, decay=decay, mask=edge_mask))

        s = ConvBN(1, name="self_att", **bn_kw)(h, train=train, decay=decay, mask=mask)  # [B,N,1]
        n = ConvBN(1, name="neib_att", **bn_kw)(y, train=train, decay=decay, mask=edge_mask)  # [B,N,k,1]
        coefs = jax.nn.softmax(nn.leaky_relu(s[:, :, None, :] + n, 0.2), axis=2)
        b_a = self.param("bias", nn.initializers.zeros, (self.features,))
        out = nn.relu(jnp.sum(coefs * y, axis=2) + b_a)
        return out, jnp.max(y, axis=2)
