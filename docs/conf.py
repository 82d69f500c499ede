"""Sphinx configuration for torchrl_s2ac."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "torchrl_s2ac"
author = "torchrl_s2ac developers"
release = "0.1.0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["ref.python"]
napoleon_use_ivar = True
