"""NOSA model classes for SGLang (registered by the plugin only when NOSA is enabled)."""
