"""The MLX backend, on mlx-lm's model files; mirrors torch_ref/ (arch, backend, reduce, tune), with
pipeline.py its own way to spread a model, as torch_ref/placement.py is torch's."""
