"""Metrics: parameter audits, perturbation and image quality, detection scores."""

from .audit import parameter_audit
from .images import image_quality, perturbation_norms, psnr, ssim
from .ranking import auroc

__all__ = ["auroc", "image_quality", "parameter_audit", "perturbation_norms", "psnr", "ssim"]
