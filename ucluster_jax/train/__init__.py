"""Training: state, the pure step, k-means initialisation, the two-phase loop."""
