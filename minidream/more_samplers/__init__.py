"""Samplers beyond the two in samplers.py (DDIM, PNDM with PLMS start), and the table of all by name.

    euler.py   Euler steps on the probability-flow ODE in sigma space (Karras et al. 2022)
    dpmpp.py   DPM-Solver++(2M): multistep, second order, on predicted x0 (Lu et al. 2022)
    prk.py     PNDM's pseudo Runge-Kutta warm-up (Liu et al. 2022, eq. 12), for pndm(start=prk_start)

Each is a function with the samplers' signature: pipeline.generate(model, prompt, sampler=euler).
SAMPLERS names them for sample.py --sampler and train.py --sampler (class and validation images).
"""

from minidream.more_samplers.dpmpp import dpmpp_2m, dpmpp_2m_karras
from minidream.more_samplers.euler import euler, init_noise_sigma
from minidream.more_samplers.prk import prk_start
from minidream.samplers import SAMPLERS as CORE_SAMPLERS

SAMPLERS = CORE_SAMPLERS | {"euler": euler, "dpmpp-2m": dpmpp_2m, "dpmpp-2m-karras": dpmpp_2m_karras}

__all__ = ["SAMPLERS", "dpmpp_2m", "dpmpp_2m_karras", "euler", "init_noise_sigma", "prk_start"]
