"""Self-supervised methods, each a LightningModule."""

from sslzoo.methods.barlowtwins import BarlowTwins
from sslzoo.methods.base import SSLMethod
from sslzoo.methods.byol import BYOL
from sslzoo.methods.dino import DINO
from sslzoo.methods.dinov2 import DINOv2
from sslzoo.methods.distillation import Distillation
from sslzoo.methods.ibot import IBOT
from sslzoo.methods.mae import MAE
from sslzoo.methods.mocov3 import MoCoV3
from sslzoo.methods.simclr import SimCLR
from sslzoo.methods.simsiam import SimSiam
from sslzoo.methods.swav import SwAV
from sslzoo.methods.vicreg import VICReg

__all__ = [
    "BYOL",
    "BarlowTwins",
    "DINO",
    "DINOv2",
    "Distillation",
    "IBOT",
    "MAE",
    "MoCoV3",
    "SSLMethod",
    "SimCLR",
    "SimSiam",
    "SwAV",
    "VICReg",
]
