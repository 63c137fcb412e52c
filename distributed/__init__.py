"""macrun's rank side: everything that runs inside a training process on every host.

This package is copied to every host at launch, so it stays small and imports only MLX, NumPy,
PyYAML and safetensors — never launcher/, typer, rich, questionary or paramiko.
"""

__version__ = "0.1.0"
MACRUN_MARKER = "macrun"  # launcher checks this to tell our package from Dask's `distributed`
