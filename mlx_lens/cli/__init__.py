"""The mlx-lens command: the parser and its commands, several models in processes."""
