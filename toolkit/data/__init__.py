"""Data: sources, the lensing generator, degradation and the streaming loader."""
