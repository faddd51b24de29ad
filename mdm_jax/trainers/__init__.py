"""Trainers: run set-up, the task-agnostic train loop, inference, checkpoints, Di[M]O.

================  ==============================================================
``setup.py``      config -> data, task, mesh, optimizer; restoring a run
``state.py``      the train state and optimizer, placed on the mesh
``steps.py``      the jitted train steps (microbatches or phases, EMA, shardings), eval
``loop.py``       ``train``: the one loop (every task), metrics, checkpoints, samples
``inference.py``  evaluate / sample a checkpoint; load an AR run as a text scorer
``samples.py``    generate -> describe -> score -> write samples
``checkpoint.py`` Orbax checkpoints with clear errors and compatibility checks
``writer.py``     metrics to JSONL and TensorBoard, the progress line
``distill.py``    Di[M]O on the loop: distil a diffusion run into a one-step generator
``classifier.py`` the image metrics' feature classifier, trained on the loop
================  ==============================================================
"""
