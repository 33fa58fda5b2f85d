"""A quantised frozen base model: the UNet's Linear weights stored in 8 or 4 bits while LoRA trains
in full precision on top (QLoRA, Dettmers et al. 2023). train.py / sample.py --base-weights.

    int8.py     per-output-channel absmax int8 (one scale per row)
    nf4.py      4-bit NormalFloat, block-wise absmax (64), two codes per byte
    linear.py   QuantLinear: the frozen Linear holding codes + scales, dequantised in forward;
                its LoRA subclass, and `quantiser`, the hook load_weights calls while reading

Only Linear layers are quantised: they hold 87% of SDXL's UNet weights (2.23 B of 2.57 B). The
3x3 convs hold 0.33 B; NF4 would save 0.49 GB more of them, for a second layer class (conv
backward through a dequantised kernel) and exact LoCon targets lost. benchmarks/quantised_base.py
measures what is kept.
"""
