"""Tools over the models and tasks: parameter and MAC counts, the papers' tables, speed and memory
benchmarks, the papers' figures, export, the demo and checkpoint conversion."""
