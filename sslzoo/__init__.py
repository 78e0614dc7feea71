"""sslzoo: self-supervised learning methods for vision, as PyTorch Lightning modules."""

__version__ = "0.1.0"
