"""Samplers beyond the two minidream trains and samples with (samplers.py: DDIM, PNDM with PLMS start).

    euler.py   Euler steps on the probability-flow ODE in sigma space (Karras et al. 2022)
    dpmpp.py   DPM-Solver++(2M): multistep, second order, on predicted x0 (Lu et al. 2022)
    prk.py     PNDM's pseudo Runge-Kutta warm-up (Liu et al. 2022, eq. 12), for pndm(start=prk_start)

Each is a function with the samplers' signature: pipeline.generate(model, prompt, sampler=euler).
"""

from minidream.more_samplers.dpmpp import dpmpp_2m
from minidream.more_samplers.euler import euler, init_noise_sigma
from minidream.more_samplers.prk import prk_start

__all__ = ["dpmpp_2m", "euler", "init_noise_sigma", "prk_start"]
