# Hydra configs, installed as the package stnbench.conf (see pyproject.toml).
