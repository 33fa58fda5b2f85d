"""What the two scripts need beyond the core.

    args.py            train.py's command line, built from TrainConfig's fields; sample.py's
    script.py          how both scripts end: one line + exit 2 for a UserError, tracebacks for bugs
    run_training.py    training.train with the chosen method, on every process torchrun started
    sample_command.py  sample.py's work: model, LoRAs, embeddings, generation, files
    morph.py           a looping animation between prompts or seeds
"""
