"""Reading checkpoints written by the original TensorFlow 1 UCluster (no TensorFlow needed)."""
