"""Growing a trained model: `expand` adds routed experts to its MoE layers (for a new domain, training only what is
new: train/freeze.py, train/onboarding.py), `upcycle` turns a dense model into a DeepSeekMoE."""

from ..train.grown_experts import GrowRecord
from .expand import ExpandReport, expand_model
from .upcycle import UpcycleReport, upcycle_model

__all__ = ["ExpandReport", "GrowRecord", "UpcycleReport", "expand_model", "upcycle_model"]
