"""Block-by-block calibration: data, the sequential pipeline, hooks, offload, shortcuts and the work folder."""
