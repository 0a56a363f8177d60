"""The training engine: the accelerate wrapper, the loop and its state."""
