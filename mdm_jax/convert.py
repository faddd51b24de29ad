"""``python -m mdm_jax.convert``: published MDLM / MDM-Prime checkpoints in and out
(``mdm_jax/cli/convert.py``, docs/published_models.md)."""


def run() -> None:
  from mdm_jax.cli import convert  # pylint: disable=import-outside-toplevel
  convert.run()


if __name__ == "__main__":
  run()
