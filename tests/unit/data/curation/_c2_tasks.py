"""Module-level task functions for the executor tests (spawned workers import them by name)."""

import os


def square_or_fail(value: int) -> int:
    if value == 3:
        raise ValueError("three is refused")
    if value == 5:
        os._exit(1)  # the worker process dies (as after a decoder segfault)
    return value * value
