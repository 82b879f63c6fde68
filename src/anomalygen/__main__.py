"""``python -m anomalygen`` (and ``accelerate launch -m anomalygen``): the ``anomalygen`` command."""

from anomalygen.cli import main

main()
