"""Imagic: text-based editing of one real image (Kawar et al., 2023) with a trained DiT.

``config`` holds the settings schema (no imontage imports, so the recipe schema may embed it),
``edit`` the three stages (embedding optimisation, fine-tuning, eta-interpolated sampling),
``cli`` the ``imontage-imagic`` command. Import the stages from ``imontage.imagic.edit``.
"""

from imontage.config.imagic import ImagicConfig, ImagicConfigError, load_imagic_config

__all__ = ["ImagicConfig", "ImagicConfigError", "load_imagic_config"]
