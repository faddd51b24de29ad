"""Model FLOPs per training token, the count behind every MFU figure in BENCHMARKS.md."""


def model_flops_per_token(model_cfg, vocab: int, seq_len: int) -> float:
  """Forward + backward matmul FLOPs per token of the DiT (PaLM/MaxText convention).

  6 x (matmul parameters, output head included) + attention's QK^T and AV, 12 x L x d per
  layer (no causal discount).  Embedding gathers, norms and the loss are not counted.
  """
  d, n_layers = int(model_cfg.d_model), int(model_cfg.num_layers)
  m = int(model_cfg.mlp_ratio) * d
  params = n_layers * (4 * d * d + 2 * d * m) + d * vocab
  return 6.0 * params + 12.0 * n_layers * seq_len * d
