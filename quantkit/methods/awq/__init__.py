"""AWQ: the search (pure functions), its statistics, apply/fold, the per-block step, memory plan and method."""
