"""Runnable examples built on dispatcher's public APIs; used by the demo and the tests.

Examples are for reading and copying: they depend only on public modules and hold no
dispatcher internals or configuration of their own.
"""
