"""The public ops: `chunk_<spec>` and `fused_recurrent_<spec>` for every shipped spec.

See DESIGN.md for the contract; each op is defined in `linattn_dsl.generated.<spec>`.
"""

from linattn_dsl.generated import *  # noqa: F401,F403
from linattn_dsl.generated import __all__  # noqa: F401
