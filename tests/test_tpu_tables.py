"""The configs x slices table of compiled-for-TPU cells (mdm_jax.benchmarks.tpu_tables)."""

import pytest

from mdm_jax.benchmarks import tpu_tables

GIB = 2 ** 30


def _fit(config, topo, batch, total_gib, bound_s, mfu):
  return {"config": config, "topology": topo, "per_chip_batch": batch, "chips": 4,
          "jax": "0.10.2", "libtpu": "0.0.42.1", "seq_len": 1024, "overrides": [],
          "rows": [{"program": "train", "fits": True, "compile_s": 12.0,
                    "memory": {"total": total_gib * GIB}, "capacity_bytes": 95 * GIB,
                    "roofline": {"step_s_lower_bound": bound_s, "bound_by": "compute",
                                 "mfu_upper_bound": mfu}}]}


def test_parse_batches():
  assert tpu_tables.parse_batches("v5e=32,v5p=128") == {"v5e": 32, "v5p": 128}
  assert set(tpu_tables.parse_batches("8").values()) == {8}
  with pytest.raises(ValueError, match="FAMILY=N"):
    tpu_tables.parse_batches("v9=3")


def test_render_fitting_refused_and_unbuilt_cells():
  oom = {"config": "owt_prime:ell=2", "topology": "v5e:2x2", "per_chip_batch": 32,
         "chips": 4, "jax": "0.10.2", "libtpu": "0.0.42.1", "seq_len": 1024,
         "rows": [{"program": "train", "fits": False, "compile_s": 5.0, "memory": None,
                   "needed_bytes": 91.3 * GIB, "available_bytes": 15.75 * GIB}]}
  bad = {"config": "owt_mdm", "topology": "v5e:3x3", "per_chip_batch": 32,
         "error": "libtpu cannot describe this slice"}
  text = tpu_tables.render([_fit("owt_mdm", "v5p:2x2x1", 8, 18.1, 0.0154, 0.99), oom, bad])
  lines = text.splitlines()
  assert "not run" in lines[0] and "jax 0.10.2, libtpu 0.0.42.1" in lines[0]
  row = [l for l in lines if l.startswith("| owt_mdm | as shipped | v5p")][0]
  # 8 sequences x 1024 tokens in 15.4 ms: the tokens/s ceiling per chip
  assert "18.1 of 95" in row and "| yes |" in row and "99%" in row and "531,948" in row
  assert "needs 91.3 of 15.75 | no" in text
  assert "not built: libtpu cannot describe this slice" in text
