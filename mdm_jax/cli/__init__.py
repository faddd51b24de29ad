"""The command lines: ``main`` (train, eval, sample, score, prepare, distill),
``eval_images`` (classifier Frechet distance, bits/dim, Di[M]O generators) and
``eval_gaussian`` (Gaussian image models: denoising loss, FD per guidance weight, probes)."""
