"""Per-Linear bit allocation to a size budget (`--target-bpw`), chosen by measured sensitivity."""
