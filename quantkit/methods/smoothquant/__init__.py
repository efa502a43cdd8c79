"""SmoothQuant: per-channel smoothing scales that move activation outliers into the weights, folded exactly
into the previous op, with the migration strength chosen by measurement per block (then a rounding step)."""
