"""SARL: semantic-aware representation learning for multi-label recognition with partial labels."""

__version__ = "0.1.0"
