"""What the two scripts need beyond the core.

    args.py            train.py's command line, built from TrainConfig's fields, and a resumed run's
                       settings; sample.py's command line and its checks
    script.py          how both scripts end: one line + exit 2 for a UserError, tracebacks for bugs
    sample_command.py  sample.py's work: model, LoRAs, embeddings, generation, files; the samplers
                       by name
    morph.py           a looping animation between prompts or seeds
"""
