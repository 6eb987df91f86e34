"""Finite-difference verification of hand-written backwards.

The public face of ``attention_ref.oracle.gradcheck``, where the code lives: import from here.
"""

from .oracle.gradcheck import *  # noqa: F403
from .oracle.gradcheck import __all__  # noqa: F401
