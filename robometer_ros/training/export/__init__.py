"""Export stage: robometer-export (onnx_export.py), a checkpoint -> a bundle of ONNX parts. Imports the
recipe stage (training.json) only."""
