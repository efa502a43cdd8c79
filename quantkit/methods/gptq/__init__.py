"""GPTQ: the algorithm (pure tensor functions), the per-block step, its memory plan and the method."""
