"""Compare any attention implementation with the reference, with tolerances that can be justified.

The public face of ``attention_ref.oracle.testing``, where the code lives: import from here.
"""
from .oracle.testing import *  # noqa: F403
from .oracle.testing import __all__  # noqa: F401
