"""ABCNet + UCluster as Flax modules."""
