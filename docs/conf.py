"""Sphinx configuration for pyro-diffusion."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from pyro_diffusion import __version__  # noqa: E402

project = "pyro-diffusion"
author = "The pyro-diffusion developers"
copyright = "2026, The pyro-diffusion developers"
release = version = __version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.napoleon",
              "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"
exclude_patterns = ["_build"]
