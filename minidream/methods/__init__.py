"""The training methods besides LoRA; registry.py chooses one from the settings (`train.py --method`).

    lora                low-rank adapters on the frozen model          (Hu et al. 2021)    minidream/method.py
    full                every UNet weight (+ the text encoders)        (Ruiz et al. 2022)  full_finetune.py
    textual-inversion   a new word's embedding in each text encoder    (Gal et al. 2022)   textual_inversion.py
    pivotal             a new word + LoRA on the UNet, together        (Roich et al. 2022) pivotal.py

    --dora              LoRA + each adapted channel's length trains    (Liu et al. 2024)   dora_method.py
    --ema-decay D       the result: an average of the trained weights  (any method)        ema.py

The core loop (minidream/training.py) trains any of them through the Method interface of
minidream/method.py; LoRA, the method DreamBooth-LoRA is about, lives there beside the interface.
This file imports nothing, so importing one module of the package (dora.py's layers, say) does not
import every method.
"""
