"""Callbacks shared by every method."""

from sslzoo.callbacks.ema import EMATeacher
from sslzoo.callbacks.knn import KNNMonitor
from sslzoo.callbacks.online_probe import OnlineProbe
from sslzoo.callbacks.throughput import Throughput

__all__ = ["EMATeacher", "KNNMonitor", "OnlineProbe", "Throughput"]
