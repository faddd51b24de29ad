"""The noising processes and their objectives, as pure functions of arrays and PRNG keys.

* ``prime``: the Prime sub-token codec and the partial-masking forward process;
* ``schedules``: masking schedules (one file per family, each registered by name);
* ``elbo``: the masked-diffusion ELBO over per-element hazards, Prime's two losses and
  the evaluation bound (a univariate schedule is the broadcast special case);
* ``autoregressive``: the exact left-to-right NLL of the AR baseline;
* ``gaussian``: Gaussian (DDPM / EDM) diffusion maths and samplers for the image arms.

This layer knows no network, dataset or trainer: the network enters as an
``apply_fn(params, inputs, t, *, train, rng)``.
"""
