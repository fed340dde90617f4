"""Argument checks shared by the modules that take counts from users."""

import numbers


def check_positive_int(value, name):
    """``value`` as an int if it is a positive integer (an integer-valued float included); a
    ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        if not (isinstance(value, float) and value.is_integer() and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
