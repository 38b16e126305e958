"""A run: the experiment spec (config), the training loop (train), the run directory and run.h5
(store), the run's lifecycle (start, resume, the sweep worker's run), and what a run records
about itself (environment, progress, TensorBoard)."""
