"""Recipes and the model zoo: reproducible, idempotent, gated builds of quantized checkpoints.

- `recipe`: one YAML recipe (model, method, scheme, options, calibration, evaluation).
- `config`: the zoo file (models x recipes, defaults, gates) expanded into entries.
- `build`: plan what changed, build it through an executor, gate, write the index.
- `entry`: build one entry (quantize, evaluate, card, manifest) resumably.
- `publish`: verify hashes, upload passing entries.
"""
