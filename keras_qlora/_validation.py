"""Argument checks shared by the public constructors."""


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_non_negative(name, value, strictly=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        value <= 0 if strictly else value < 0
    ):
        kind = "positive" if strictly else "non-negative"
        raise ValueError(f"`{name}` must be a {kind} number. Received: {name}={value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}"
        )
