"""PNDM's pseudo Runge-Kutta warm-up, as diffusers' PNDMScheduler runs it with skip_prk_steps=False (SD 1.x
configs). SD and SDXL use the PLMS start of minidream.samplers.pndm instead."""


def prk_start(model, x, ts, stride, step, callback):
    """The paper's pseudo Runge-Kutta warm-up (Liu et al. 2022, eq. 12), for pndm(start=prk_start): over each
    of the first three intervals t -> t_next, RK4 weights (1/6, 1/3, 1/3, 1/6) on four evaluations, each
    transferred from the interval's starting x;
    only the first joins the PLMS history. diffusers quirk kept: the half step is t_next + stride // 2
    for the evaluations but t - stride // 2 for the first transfer (the same under leading spacing)."""
    if len(ts) < 4:
        raise ValueError(f"the PRK warm-up needs steps >= 4, got {len(ts)}; use the PLMS start (start=None)")
    half, outs, i = stride // 2, [], 0

    def report(t, x):
        nonlocal i
        if callback is not None:
            callback(i, t, x)
        i += 1

    for t, t_next in zip(ts[:3], ts[1:4]):
        mid = t_next + half
        e1 = model(x, t)
        outs.append(e1)
        x1 = step(x, e1, t, t - half)
        report(t, x1)
        e2 = model(x1, mid)
        x2 = step(x, e2, t, mid)
        report(mid, x2)
        e3 = model(x2, mid)
        x3 = step(x, e3, t, t_next)
        report(mid, x3)
        e4 = model(x3, t_next)
        x = step(x, 1 / 6 * e1 + 1 / 3 * e2 + 1 / 3 * e3 + 1 / 6 * e4, t, t_next)
        report(t_next, x)
    return x, outs, ts[3:], i
