"""Configs by name or path, dotted access, and the resolved config a run keeps.

Every key, with its default and meaning, is declared once, in ``configs/base.py``
(installed as ``mdm_jax.configs.base``); experiment configs start from it and
override a few values.  ``--config`` takes a packaged name (``shakespeare_prime``,
``shakespeare_prime:tiny``) or a path to a config file (``configs/shakespeare_prime.py``,
``my/experiment.py:ell=3``), from any directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import ml_collections

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import paths
from mdm_jax.core.errors import ConfigError

CONFIGS_PACKAGE = "mdm_jax.configs"


def configs_dir() -> str:
  """The folder of the packaged configs (``configs/`` of the source tree, installed as
  ``mdm_jax.configs``)."""
  spec = importlib.util.find_spec(CONFIGS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(f"The packaged configs ({CONFIGS_PACKAGE}) are not installed; reinstall "
                      "mdm_jax (pip install .).")
  return list(spec.submodule_search_locations)[0]


def packaged_config_names() -> List[str]:
  """The names ``--config`` accepts without a path (every ``configs/*.py`` but ``base``)."""
  d = configs_dir()
  return sorted(f[:-3] for f in os.listdir(d)
                if f.endswith(".py") and not f.startswith("_") and f != "base.py")


def resolve_config_path(spec: str) -> str:
  """``NAME[:ARGS]`` or ``PATH[:ARGS]`` -> ``PATH[:ARGS]`` of an existing config file.

  A path that exists is kept.  Otherwise the file's stem names a packaged config
  (``shakespeare_prime``, ``shakespeare_prime.py`` or ``configs/shakespeare_prime.py``
  from another directory).  Raises ``ConfigError`` naming the packaged configs.
  """
  if paths.is_remote(spec):   # gs://BUCKET/file.py[:ARGS]: read from a local copy
    scheme = paths.scheme(spec)
    path, sep, arg = spec[len(scheme) + 3:].partition(":")
    remote = f"{scheme}://{path}"
    paths.check_backend(remote)
    if not paths.exists(remote):
      raise ConfigError(f"--config={spec}: no config file at {remote}.")
    local = os.path.join(tempfile.mkdtemp(prefix="mdm_jax_config_"), paths.basename(remote))
    paths.download(remote, local)
    return local + sep + arg
  path, sep, arg = spec.partition(":")
  if os.path.isfile(os.path.expanduser(path)):
    return spec
  stem = os.path.basename(path)
  stem = stem[:-3] if stem.endswith(".py") else stem
  names = packaged_config_names()
  if stem in names and (os.sep not in path or os.path.basename(os.path.dirname(path)) == "configs"):
    return os.path.join(configs_dir(), stem + ".py") + sep + arg
  raise ConfigError(f"--config={spec}: no config file {path!r} and no packaged config of that "
                    f"name; packaged configs: {', '.join(names)} (or give a path to a .py file).")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of ``NAME[:ARGS]`` (a packaged config) or ``PATH[:ARGS]``, as ``--config`` reads it."""
  path, _, arg = resolve_config_path(spec).partition(":")
  if os.path.dirname(os.path.abspath(path)) == os.path.abspath(configs_dir()):
    module = importlib.import_module(f"{CONFIGS_PACKAGE}.{os.path.basename(path)[:-3]}")
  else:
    mspec = importlib.util.spec_from_file_location(
        f"_mdm_jax_config_{abs(hash(path))}", os.path.abspath(os.path.expanduser(path)))
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
  fn = module.get_config
  if not arg:
    return fn()
  try:
    return fn(arg)
  except TypeError as e:
    if e.__traceback__ is not None and e.__traceback__.tb_next is None:
      # Raised by the call itself, before get_config ran: it takes no argument.
      raise ConfigError(f"--config={spec}: {path} takes no variant (the part after ':').") from e
    raise


def merge_block(defaults: ml_collections.ConfigDict, given) -> ml_collections.ConfigDict:
  """``defaults`` (a block of the base config) with ``given``'s keys on top: a complete block
  from a partial one, as plain values (a list where the default is a tuple stays a list)."""
  d = defaults.to_dict()
  if given is not None:
    d.update(given.to_dict() if hasattr(given, "to_dict") else dict(given))
  return ml_collections.ConfigDict(d)


def get_path(config, dotted: str):
  """``config["a"]["b"]`` for ``"a.b"``."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; tuples become lists (as after a JSON round trip)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def to_dict(config) -> Dict[str, Any]:
  """The config as plain JSON-able dicts."""
  return json.loads(config.to_json_best_effort())


def _deep_update(base: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
  for k, v in new.items():
    if isinstance(v, dict) and isinstance(base.get(k), dict):
      _deep_update(base[k], v)
    else:
      base[k] = v
  return base


def from_dict(d: Dict[str, Any]) -> ml_collections.ConfigDict:
  """An (unlocked) ConfigDict from ``to_dict``'s output (a run's ``config.json``), with the
  mesh tuples restored; keys it lacks (added to the library later) take their defaults."""
  config = ml_collections.ConfigDict(_deep_update(get_base_config().to_dict(), d))
  if "mesh" in config:
    for key in ("shape", "axes"):
      if key in config.mesh:
        config.mesh[key] = tuple(config.mesh[key])
    if "logical_rules" in config.mesh:
      config.mesh.logical_rules = tuple(
          (r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in config.mesh.logical_rules)
  return config


def save_config(config, workdir: str, is_main: bool = True) -> Optional[str]:
  """Writes ``workdir/config.json`` (the resolved config of the run) on the main process."""
  if not is_main:
    return None
  path = paths.join(workdir, "config.json")
  paths.atomic_write(path, config.to_json_best_effort(indent=2))
  return path
