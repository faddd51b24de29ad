"""docs/reference.md is generated from configs/base.py and the registries, and is current."""

import os

from mdm_jax.cli import reference
from mdm_jax.configs.base import get_base_config
from mdm_jax.diffusion.schedules import SCHEDULES
from mdm_jax.sampling import SAMPLERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_page_is_current():
  path = os.path.join(REPO, "docs", "reference.md")
  with open(path) as f:
    current = f.read()
  assert current == reference.render(), (
      "docs/reference.md is out of date: run python -m mdm_jax.cli.reference")


def test_reference_lists_every_key_and_registered_name():
  text = reference.render()
  for key in ("model.num_layers", "prime.ell", "schedule.slot_tilt", "gaussian.form"):
    assert f"| `{key}` |" in text
  flat = reference._flat(get_base_config())
  assert sum(1 for line in text.splitlines() if line.startswith("| `") and "." in line[3:40]) \
      >= len([k for k, _ in flat if "." in k])
  for name in SCHEDULES.names() + SAMPLERS.names():
    assert f"| `{name}` |" in text


def test_comments_follow_their_key_across_continuation_lines():
  comments = reference.key_comments()
  assert comments["prime.ell"].startswith("sub-tokens per token")
  assert "nearby ids" in comments["data.token_order"]          # a continued comment
  assert "mdm_jax/data/token_order.py" in comments["data.token_order"]
