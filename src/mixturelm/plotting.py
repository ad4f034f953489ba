"""matplotlib, set up once for files (no display): every plot of mixturelm goes through here."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
