"""Trainers: run set-up, the task-agnostic train loop, inference, checkpoints, Di[M]O.

================  ==============================================================
``setup.py``      config -> data, task, mesh, optimizer; restoring a run
``state.py``      the train state and optimizer, placed on the mesh
``steps.py``      the jitted train and eval steps (microbatches, EMA, shardings)
``loop.py``       ``train_and_evaluate``: the loop, metrics, checkpoints, samples
``inference.py``  evaluate / sample a checkpoint; load an AR run as a text scorer
``samples.py``    generate -> describe -> score -> write samples
``checkpoint.py`` Orbax checkpoints with clear errors and compatibility checks
``writer.py``     metrics to JSONL and TensorBoard, the progress line
``distill.py``    Di[M]O: distil a diffusion run into a one-step generator
================  ==============================================================
"""
