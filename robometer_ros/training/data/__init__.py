"""Data stage: the on-disk episode store (store.py), the importers that fill it (bags.py, bag_repair.py,
hf_rows.py, metaworld.py) and the robometer-dataset command (dataset_cli.py). Imports no other stage."""
