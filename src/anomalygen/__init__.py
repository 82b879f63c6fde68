"""anomalygen: few-shot anomaly generation for industrial visual inspection."""

from anomalygen.types import AnomalySample, DefectExample, ImageRecord

__all__ = ["AnomalySample", "DefectExample", "ImageRecord"]
__version__ = "0.1.0"
