"""Simulators of training data (strong lensing, its labelled substructure classes)."""
