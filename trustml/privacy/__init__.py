"""Differentially private training: exact per-sample clipping, noise, Poisson sampling, accounting."""

from trustml.privacy.accounting import PrivacyAccountant, calibrate_noise
from trustml.privacy.clipping import PerSampleClipper
from trustml.privacy.engine import PrivateTraining, ensure_decomposable, make_private
from trustml.privacy.sampling import PoissonBatches
from trustml.privacy.step import DPStep

__all__ = [
    "DPStep",
    "PerSampleClipper",
    "PoissonBatches",
    "PrivacyAccountant",
    "PrivateTraining",
    "calibrate_noise",
    "ensure_decomposable",
    "make_private",
]
