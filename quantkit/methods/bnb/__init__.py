"""bitsandbytes NF4 / FP4 / LLM.int8: quantized by transformers while it loads the model."""
