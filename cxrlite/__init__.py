"""cxrlite: a chest X-ray vision-language model from training to a fast, safe service."""

__version__ = "0.1.0"
