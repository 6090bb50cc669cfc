"""klcrypt: dm-crypt in userspace with Intel Key Locker."""

__version__ = "0.1.0"
