"""robometer_ros.training: the training side of the package, grouped by stage.

    data/        the episode store, its importers (rosbag2, RBM-1M rows, Meta-World) and robometer-dataset
    recipe/      the training recipe: config, sampling, collation, losses, the held-out validation, the trainer
    evaluation/  robometer-eval, robometer-score (sharded), robometer-calibrate, robometer-filter-bc
    export/      robometer-export (checkpoint -> ONNX bundle)

Imports go one way: data <- recipe <- evaluation, and export takes what it needs from recipe; a stage
never imports a later one. Nothing is re-exported here: import a module by its full path.
"""
