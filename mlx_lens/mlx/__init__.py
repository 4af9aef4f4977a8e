"""The MLX backend, on mlx-lm's model files; mirrors torch_ref/ file for file."""
