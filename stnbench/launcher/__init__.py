"""Hydra plugins of stnbench, installed as the package hydra_plugins.stnbench_launcher (Hydra
finds launchers only under hydra_plugins). Kept free of torch imports: Hydra imports every plugin
at start-up."""
