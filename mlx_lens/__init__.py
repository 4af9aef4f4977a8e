"""mlx-lens: a per-layer logit lens, MLX first, with a PyTorch reference."""
