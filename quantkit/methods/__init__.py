"""Quantization methods. Each module defines one `Method`; `quantkit.registry` finds them."""
