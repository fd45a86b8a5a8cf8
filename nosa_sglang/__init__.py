"""nosa-sglang: NOSA sparse attention with a pinned-host KV tier, inside SGLang."""

from nosa_sglang.config import NosaConfig

__all__ = ["NosaConfig"]
__version__ = "0.1.0"
