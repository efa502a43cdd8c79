"""Evaluation: perplexity, and agreement with a base model, under a fixed protocol."""
