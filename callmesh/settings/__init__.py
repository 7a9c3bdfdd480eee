"""callmesh's configuration: every setting declared once (``table``), read once per process.

``load(process, env, flags)`` reads a process's settings (flag, then environment, then
default) into :class:`Values`; ``flags.add_flags`` and ``flags.resolve`` do the same for
a parsed command line, and generate its ``--help``. See docs/configuration.md.
"""

from callmesh.secret_masking import mask_url
from callmesh.settings.kinds import ConfigError
from callmesh.settings.model import Setting, Values
from callmesh.settings.reading import check_fields, default, load, settings_for

__all__ = [
    "ConfigError",
    "Setting",
    "Values",
    "check_fields",
    "default",
    "load",
    "mask_url",
    "settings_for",
]
