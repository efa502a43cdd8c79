"""Evaluation: quality (ppl, KL, top-1), speed, memory and size of checkpoints against a base.

protocol (text, windows, scored tokens) -> quality (pure tensor maths) -> runner (one
model at a time, base spill via cache) -> report / plot. hardware, speed and memory
hold the device-specific parts; describe reads what a path is from its files.
"""
