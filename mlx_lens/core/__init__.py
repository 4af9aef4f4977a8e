"""Backend-neutral core (numpy only, never torch or mlx): the contract and training's protocols,
the lens, error bounds, float64 numerics, reductions into LayerStats, errors, files, progress."""
