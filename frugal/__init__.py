"""frugal: CNNs that need fewer parameters and less compute, measured against a standard CNN."""

__version__ = "0.1.0"
