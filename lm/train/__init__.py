"""Training: state, optimizer, sharding, the jitted steps, checkpoints and the loop."""
