"""Named canonical cases: a seeded grid of attention configurations to parametrise tests with.

The public face of ``attention_ref.oracle.cases``, where the code lives: import from here.
"""

from .oracle.cases import *  # noqa: F403
from .oracle.cases import __all__  # noqa: F401
