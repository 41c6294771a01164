"""Typed settings: every option declared once, on a dataclass field, with flags, YAML keys and validation
derived from it (torch-free). See docs/architecture.md, "Where a setting is declared"."""
from slaknet.settings.aliases import ALIASES, REFUSED, VALUE_FLAGS, canonical_key
from slaknet.settings.common import CommonOptions
from slaknet.settings.cli import SettingsParser, add_refused, add_setting, add_settings, given_settings
from slaknet.settings.fields import (FieldInfo, Setting, build_settings, check_section, check_value, coerce, field_infos,
                                     is_settings_class, setting, str2bool)
from slaknet.settings.sections import (AugmentSettings, DataSettings, ModelSettings, OptimSettings, RunSettings)

__all__ = ["setting", "build_settings", "Setting", "FieldInfo", "field_infos", "coerce", "check_value", "check_section", "str2bool",
           "is_settings_class", "SettingsParser", "add_settings", "add_setting", "add_refused", "given_settings",
           "ALIASES", "VALUE_FLAGS", "REFUSED", "canonical_key", "DataSettings", "ModelSettings", "OptimSettings",
           "AugmentSettings", "RunSettings", "CommonOptions"]
