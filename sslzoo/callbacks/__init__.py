"""Callbacks shared by every method."""

from sslzoo.callbacks.batch_seed import BatchSeed
from sslzoo.callbacks.ema import EMATeacher
from sslzoo.callbacks.knn import KNNMonitor
from sslzoo.callbacks.log_flush import FlushLogs
from sslzoo.callbacks.online_probe import OnlineProbe
from sslzoo.callbacks.speed import ChannelsLast, CompileBackbone
from sslzoo.callbacks.throughput import Throughput

__all__ = [
    "BatchSeed",
    "ChannelsLast",
    "CompileBackbone",
    "EMATeacher",
    "FlushLogs",
    "KNNMonitor",
    "OnlineProbe",
    "Throughput",
]
