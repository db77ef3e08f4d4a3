"""Routing analysis (`seekmoe analyze`): what each MoE layer decides on held-out text, what experts specialize in (by
source, token and modality), ablation probes, and a self-contained HTML report."""

from .analyze import analyze, route
from .capture import LayerRouting, RoutingCapture
from .probes import ablation_probes, routing_override

__all__ = ["analyze", "route", "LayerRouting", "RoutingCapture", "ablation_probes", "routing_override"]
