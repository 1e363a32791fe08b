"""Training: losses, the jitted update step, supervised warm start and the trainer loop."""
