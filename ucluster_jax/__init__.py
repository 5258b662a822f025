"""UCluster in JAX/Flax."""
