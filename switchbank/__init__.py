"""switchbank: serve many fine-tuned vision models from one backbone with binary task switches.

A task switch is the T-Switch compression of a fine-tuned model's task vector: per tensor a 1-bit
activation mask, a 1-bit polarity (sign) and one fp32 scale. See docs/method.md.
"""

__version__ = "0.1.0"
