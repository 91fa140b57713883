"""Training recipes (YAML), loaded by ``deformvit train --recipe NAME``."""
