"""The leaves: what every floor shares (errors, YAML -> dataclasses, the recipe schema, atomic
writes, logging, registries, command plumbing, metrics and their intervals); imports no other
floor."""
