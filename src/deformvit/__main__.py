"""``python -m deformvit ...`` (also under ``torchrun``)."""
from .cli import main

main()
