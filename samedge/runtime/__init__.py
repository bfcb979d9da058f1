"""The bedside runtime: numpy plus one inference backend, no torch.

``Predictor`` mirrors SamPredictor: ``set_image`` runs the encoder once, ``predict`` decodes any
number of prompts in milliseconds; ``VolumePredictor`` does both across a volume. Backends are
imported lazily, only the one asked for.
"""

from samedge.runtime.bundle import Bundle
from samedge.runtime.predictor import Prediction, Predictor, Segmentation
from samedge.runtime.transforms import ImageFrame, Preprocessing
from samedge.runtime.volume import VolumeLabels, VolumeMask, VolumePredictor

__all__ = ["Bundle", "ImageFrame", "Prediction", "Predictor", "Preprocessing", "Segmentation",
           "VolumeLabels", "VolumeMask", "VolumePredictor"]
