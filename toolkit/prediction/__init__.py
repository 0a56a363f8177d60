"""What `predict` reads and writes: inputs as jobs, image files written like their source,
images of any size through a model in tiles."""
