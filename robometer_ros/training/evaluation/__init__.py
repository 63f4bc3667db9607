"""Evaluation stage: robometer-eval (evaluate.py), robometer-score (score.py, sharding.py), robometer-calibrate
(calibrate.py) and robometer-filter-bc (filtering.py). Imports the data and recipe stages."""
