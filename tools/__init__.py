"""Support for tests and benchmarks, not used when the pack runs: random weights for parity tests
(randomise), the image analysis that scores the built-in model's samples (scene_analysis), the
held-out scenes and per-band losses the benchmarks report (evaluation), copies of model files with
their tensors or metadata edited (model_files), and the command that regenerates the golden files the
tests compare against (`python -m ldm_nodes.tools.goldens`), and mutation testing of the math modules
(`python -m ldm_nodes.tools.mutate`)."""
