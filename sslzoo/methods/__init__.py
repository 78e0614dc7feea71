"""Self-supervised methods, each a LightningModule."""

from sslzoo.methods.base import SSLMethod
from sslzoo.methods.byol import BYOL
from sslzoo.methods.simclr import SimCLR

__all__ = ["BYOL", "SSLMethod", "SimCLR"]
