"""Sphinx configuration for pyro-diffusion."""

import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(".."))

# The tutorials live in ../tutorials (where users run them); Sphinx renders copies (and their
# README as the overview), with the outputs they were committed with (never executed here).
_HERE = os.path.dirname(os.path.abspath(__file__))
_TUTORIALS = os.path.join(_HERE, "tutorials")
shutil.rmtree(_TUTORIALS, ignore_errors=True)
os.makedirs(_TUTORIALS)
for _name in sorted(os.listdir(os.path.join(_HERE, "..", "tutorials"))):
    if _name.endswith(".ipynb") or _name == "README.md":
        shutil.copy(os.path.join(_HERE, "..", "tutorials", _name), _TUTORIALS)

from pyro_diffusion import __version__  # noqa: E402

project = "pyro-diffusion"
author = "The pyro-diffusion developers"
copyright = "2026, The pyro-diffusion developers"
release = version = __version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.napoleon",
              "sphinx.ext.viewcode", "myst_nb"]
nb_execution_mode = "off"
suppress_warnings = ["mystnb.unknown_mime_type"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
