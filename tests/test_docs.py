"""The documentation's relative links point at files that exist, and the README's first two
commands are the ones CI runs."""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown_files():
  files = glob.glob(os.path.join(REPO, "*.md")) + glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                            recursive=True)
  files += glob.glob(os.path.join(REPO, "launch", "*.md")) + glob.glob(
      os.path.join(REPO, "colabs", "*.md"))
  return sorted(files)


def test_relative_links_resolve():
  broken = []
  files = _markdown_files()
  assert len(files) > 10
  for path in files:
    text = open(path, encoding="utf-8").read()
    for target in LINK.findall(text):
      if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        continue
      rel = target.split("#", 1)[0]
      if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), rel))):
        broken.append(f"{os.path.relpath(path, REPO)} -> {target}")
  assert not broken, "\n".join(broken)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
  assert block[0].startswith("bash launch/setup_env.sh && .venv/bin/python -m mdm_jax.main "
                             "--config=shakespeare_prime")
  test_cmd = block[1]
  assert "pytest tests" in test_cmd
  ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
  assert test_cmd in ci
