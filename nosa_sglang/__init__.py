"""nosa-sglang: NOSA sparse attention with a pinned-host KV tier, inside SGLang.

`nosa_sglang.Engine(...)`, `nosa_sglang.Runtime(...)` and `nosa_sglang.NosaServerFlags` resolve lazily:
importing the package does not import SGLang.
"""

from nosa_sglang._lazy import lazy_exports
from nosa_sglang.config import NosaConfig

_EXPORTS = {"Engine": "engine", "Runtime": "engine", "NosaServerFlags": "server_flags"}
_lazy_all, __getattr__, _lazy_dir = lazy_exports(__name__, _EXPORTS)
__all__ = ["NosaConfig", *_lazy_all]
__version__ = "0.1.0"


def __dir__() -> list[str]:
    return sorted(__all__)
