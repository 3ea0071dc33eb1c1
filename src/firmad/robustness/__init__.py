"""Robustness of one-class detectors: attacks on the anomaly score, robust evaluation, texture
probes and constructed (robust / non-robust feature) datasets after Ilyas et al. 2019."""
