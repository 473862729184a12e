"""Where the server is and who we are: the environment, then a TOML file, then defaults.

IMAGESTORE_URL, IMAGESTORE_TOKEN and IMAGESTORE_CACHE win over the file
($IMAGESTORE_CONFIG, else $XDG_CONFIG_HOME/imagestore/config.toml, else
~/.config/imagestore/config.toml), whose keys are url, token, cache and retries.
"""

import os
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from imagestore_client.errors import UsageError

FILE_KEYS = {"url": str, "token": str, "cache": str, "retries": int}
ENVIRONMENT = {"url": "IMAGESTORE_URL", "token": "IMAGESTORE_TOKEN", "cache": "IMAGESTORE_CACHE"}
DEFAULT_RETRIES = 8


@dataclass
class Config:
    """The settings of one run of the command."""

    url: str | None
    token: str | None
    cache: Path
    state: Path
    retries: int = DEFAULT_RETRIES
    source: str = "the environment"


def xdg_folder(env, variable, fallback):
    """An XDG base folder: the variable when it is an absolute path, else ~/fallback."""
    value = env.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def config_path(env):
    """The configuration file this run reads (it need not exist)."""
    if env.get("IMAGESTORE_CONFIG"):
        return Path(env["IMAGESTORE_CONFIG"])
    return xdg_folder(env, "XDG_CONFIG_HOME", ".config") / "imagestore" / "config.toml"


def read_file(path):
    """The settings in a config file ({} when there is none), each of its expected type."""
    try:
        with open(path, "rb") as file:
            settings = tomllib.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    for key, value in settings.items():
        if key not in FILE_KEYS:
            raise UsageError(f"{path}: unknown setting {key!r} (known: {', '.join(FILE_KEYS)})")
        if not isinstance(value, FILE_KEYS[key]) or isinstance(value, bool):
            raise UsageError(f"{path}: {key} must be a {FILE_KEYS[key].__name__}")
    if "token" in settings:
        warn_if_readable(path)
    return settings


def warn_if_readable(path):
    """Say so when a file holding a token can be read by other users (as ssh does)."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"imagestore: warning: {path} holds a token and others can read it "
              f"(chmod 600 {path})", file=sys.stderr)


def load_config(env=None, server=True):
    """The settings of this run; UsageError when no server is configured (server=False:
    a command that needs none, whose url may be None)."""
    env = os.environ if env is None else env
    path = config_path(env)
    settings = read_file(path)
    source = {key: str(path) for key in settings}
    for key, variable in ENVIRONMENT.items():
        if env.get(variable):
            settings[key], source[key] = env[variable], variable
    if not settings.get("url"):
        if server:
            raise UsageError(f"no server configured: set IMAGESTORE_URL, or url in {path}")
        settings["url"], source["url"] = "", "nowhere"
    elif not settings["url"].startswith(("http://", "https://")):
        raise UsageError(f"the server's URL must start with http:// or https://: "
                         f"{settings['url']!r} (from {source['url']})")
    if settings.get("retries", 0) < 0:
        raise UsageError(f"{path}: retries must be 0 or more")
    cache = settings.get("cache") or xdg_folder(env, "XDG_CACHE_HOME", ".cache") / "imagestore"
    return Config(url=settings["url"].rstrip("/") or None, token=settings.get("token") or None,
                  cache=Path(cache).expanduser(),
                  state=xdg_folder(env, "XDG_STATE_HOME", ".local/state") / "imagestore",
                  retries=settings.get("retries", DEFAULT_RETRIES),
                  source=source["url"])
