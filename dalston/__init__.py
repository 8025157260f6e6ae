"""Dalston: self-hosted speech-to-text on NATS."""

__version__ = "0.1.0"
