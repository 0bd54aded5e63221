"""trustml: private and fair machine learning with PyTorch."""

__version__ = "0.1.0"
