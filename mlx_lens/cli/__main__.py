"""`python -m mlx_lens.cli`: the mlx-lens command."""
import sys

from mlx_lens.cli.main import command

sys.exit(command())
