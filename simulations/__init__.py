"""Synthetic merchants, attack injectors, partitioners, baselines, evaluation and `fedanom simulate`."""
