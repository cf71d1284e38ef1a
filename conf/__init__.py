"""The YAML config groups, installed as the package mnist_sweep.conf (Hydra: pkg://mnist_sweep.conf)."""
