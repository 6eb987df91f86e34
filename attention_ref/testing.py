"""Compare any attention implementation with the reference, with tolerances that can be justified.

The public face of ``attention_ref.oracle.testing`` (the error budget, the baselines) and of
``attention_ref.oracle.compare`` (``compare``, ``assert_close``, ``Comparison``, ...), which it
re-exports: import from here.
"""

from .oracle.testing import *  # noqa: F403
from .oracle.testing import __all__  # noqa: F401
