"""Evaluation tools run from the checkout (``python -m eval.<tool>``); not an installed package."""
