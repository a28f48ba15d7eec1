"""Semi-discrete optimal transport (AE-OT) and mode-mixture code generation for the MMLM attack."""

from backdoorlab.ot.extension import (
    MassCenters,
    ModeMixture,
    cell_angles,
    class_distances,
    extend,
    extension_weights,
    mass_centers,
    mode_mixture,
    neighbours,
)
from backdoorlab.ot.solver import OTConfig, OTResult, SemiDiscreteOT

__all__ = [
    "MassCenters", "ModeMixture", "OTConfig", "OTResult", "SemiDiscreteOT", "cell_angles",
    "class_distances", "extend", "extension_weights", "mass_centers", "mode_mixture", "neighbours",
]
