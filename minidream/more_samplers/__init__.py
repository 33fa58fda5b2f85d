"""Samplers beyond the two minidream trains and samples with (samplers.py: DDIM, PNDM with PLMS start).

    euler.py   Euler steps on the probability-flow ODE in sigma space (Karras et al. 2022)
    prk.py     PNDM's pseudo Runge-Kutta warm-up (Liu et al. 2022, eq. 12), for pndm(start=prk_start)

Importing this package offers "euler" to minidream.pipeline.generate (sample.py does).
"""

from minidream.more_samplers.euler import euler, init_noise_sigma
from minidream.more_samplers.prk import prk_start
from minidream.pipeline import SAMPLERS

SAMPLERS["euler"] = euler

__all__ = ["euler", "init_noise_sigma", "prk_start"]
