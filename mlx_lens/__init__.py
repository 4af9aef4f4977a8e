"""mlx-lens: a per-layer logit lens, MLX first, with a PyTorch reference.

    import mlx_lens
    lens = mlx_lens.load()      # see mlx_lens/api.py and the README's "Python API"
"""
from mlx_lens.api import ModelLens, load

__all__ = ["ModelLens", "load"]
