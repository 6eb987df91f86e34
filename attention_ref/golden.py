"""Golden test vectors: a directory of cases for implementations outside Python.

The public face of ``attention_ref.oracle.golden``, where the code lives: import from here.
"""

from .oracle.golden import *  # noqa: F403
from .oracle.golden import __all__  # noqa: F401
