"""Moved to looped.integrations.hf; `looped.hf.<module>` still imports the moved module."""
