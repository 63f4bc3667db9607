"""Recipe stage: what robometer-train does: config.py (YAML recipes, training.json), sampling.py, collate.py,
losses.py, metrics.py, verdicts.py, validation.py (held-out evaluation, also robometer-eval's) and trainer.py.
Of the other stages it imports data/ only."""
