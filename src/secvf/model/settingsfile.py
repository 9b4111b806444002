"""Reading a settings file under ``$SECVF_HOME/config/`` (standard library only, so the
stdlib-only event log reads its retention file the same way the pydantic settings do)."""

from __future__ import annotations

from pathlib import Path

from secvf.errors import ConfigError


def read_settings_text(path: Path) -> str | None:
    """The text of settings file ``path``, or None if it does not exist.

    Raises:
        ConfigError: it exists but cannot be read (or is not UTF-8).
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
