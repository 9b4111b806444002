"""How virtiofsd serves shares: ``$SECVF_HOME/config/shares.json`` (every key optional).

``{"cache": "auto", "timeout_s": null, "thread_pool_size": 0, "xattr": false,
"readdirplus": true, "writeback": false}``

* ``cache``: virtiofsd's cache mode. ``auto`` (default): the guest drops a file's pages
  when it opens it again, so edits made on the host show at the next open; ``always``
  keeps pages across opens (a file the host changes can stay stale for as long as the
  guest caches it); ``none``: no caching of data or metadata at all.
* ``timeout_s``: how long the guest may trust a name or a file's attributes (size,
  mode, times) without asking virtiofsd again. It bounds how late ``stat`` in the guest
  (and so ``git status``) notices a file the host removed, renamed or changed; opening a
  file always reads what the host wrote. ``null`` (default): :data:`AUTO_TIMEOUT_S`
  with ``cache: auto`` (docs/sandbox.md, "Speed", has the measurements behind it), the
  cache mode's own otherwise (``always`` 1 day, ``none`` 0). The C virtiofsd (Debian 12)
  takes it; the Rust one (Debian 13) has no such option: there the mode's own applies
  (``auto``: 1 s) and an explicit ``timeout_s`` is refused.
* ``thread_pool_size``: virtiofsd worker threads (0: requests are served on the queue's
  own thread).
* ``xattr``: serve extended attributes (reading; setting them stays refused by the
  share seccomp filter). ``readdirplus``: directory listings carry attributes.
  ``writeback``: the guest caches writes and sends them later.

None of these touches what makes a share safe (docs/security.md): the read-only bind,
the id-mapped user namespace and the seccomp filter are the same whatever they say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from secvf.model.runtime import read_settings
from secvf.store import paths

CONFIG_FILE = "shares.json"
MAX_THREAD_POOL = 64
MAX_TIMEOUT_S = 86400.0
#: The guest's name and attribute cache time with ``cache: auto`` (virtiofsd's own: 1 s).
AUTO_TIMEOUT_S = 10.0


class ShareSettings(BaseModel):
    """What ``config/shares.json`` says (defaults for what it leaves out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: Literal["auto", "always", "none"] = "auto"
    timeout_s: float | None = Field(default=None, ge=0, le=MAX_TIMEOUT_S)
    thread_pool_size: int = Field(default=0, ge=0, le=MAX_THREAD_POOL)
    xattr: bool = False
    readdirplus: bool = True
    writeback: bool = False

    @property
    def effective_timeout_s(self) -> float | None:
        """The timeout the C virtiofsd is given (None: the cache mode's own)."""
        if self.timeout_s is None and self.cache == "auto":
            return AUTO_TIMEOUT_S
        return self.timeout_s

    def c_options(self) -> tuple[str, ...]:
        """These settings as QEMU's C virtiofsd options (beside source and sandbox)."""
        opts = [f"cache={self.cache}",
                "xattr" if self.xattr else "no_xattr",
                "readdirplus" if self.readdirplus else "no_readdirplus",
                "writeback" if self.writeback else "no_writeback"]
        if self.effective_timeout_s is not None:
            opts.append(f"timeout={self.effective_timeout_s:g}")
        return (*(arg for opt in opts for arg in ("-o", opt)),
                f"--thread-pool-size={self.thread_pool_size}")

    def rust_options(self) -> tuple[str, ...]:
        """These settings as the Rust virtiofsd's options.

        Raises:
            ValueError: ``timeout_s`` is set (the Rust virtiofsd has no such option).
        """
        if self.timeout_s is not None:
            raise ValueError("timeout_s is not supported by the Rust virtiofsd (it takes the "
                             "cache mode's own timeouts)")
        cache = {"none": "never"}.get(self.cache, self.cache)
        return ("--cache", cache, f"--thread-pool-size={self.thread_pool_size}",
                *(("--xattr",) if self.xattr else ()),
                *(() if self.readdirplus else ("--no-readdirplus",)),
                *(("--writeback",) if self.writeback else ()))


def settings_path() -> Path:
    """``$SECVF_HOME/config/shares.json``."""
    return paths.settings_file(CONFIG_FILE)


def load_settings() -> ShareSettings:
    """The settings in force (defaults when the file does not exist).

    Raises:
        ConfigError: the file is unreadable or not valid settings.
    """
    return read_settings(ShareSettings, settings_path())


__all__ = ["AUTO_TIMEOUT_S", "CONFIG_FILE", "ShareSettings", "load_settings", "settings_path"]
