"""The studio's option form, generated from the option metadata of glmtune/config.py.

Every TrainConfig field becomes one form field (its kind from the annotation, its choices and range from
the metadata, its help in English and Chinese), grouped as `section_of` and the docs group them, so an
option added to config.py appears in the page without touching the studio. The studio's values go back
through the same `build_config` as `glmtune train`'s flags, and `command_words` writes the flags of the
equivalent `glmtune train` command, which is exactly what the studio runs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any

from glmtune import config as options_module  # looked up at each call: tests add an option to it
from glmtune.errors import GlmtuneError

# Options the run manager owns: the studio writes every run into runs_dir/NAME and continues it by name.
RUN_OWNED = ("output_dir", "overwrite", "resume")
AUTO = "auto"  # the choice shown for a true/false option whose unset value means "decide for me"


@dataclass(frozen=True)
class OptionField:
    name: str
    section: str
    kind: str  # choice, bool, auto_bool, int, float, text, files
    default: Any
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    optional: bool = False  # an empty box means unset (the option's own default rule)
    help_en: str = ""
    help_zh: str = ""

    def help(self, lang: str) -> str:
        return (self.help_zh or self.help_en) if lang == "zh" else self.help_en

    def empty(self) -> Any:
        """The form value that stands for the option's default."""
        if self.kind == "auto_bool" or (self.kind == "choice" and self.default is None):
            return AUTO
        if self.kind in ("bool", "choice"):
            return self.default
        return "" if self.default is None else self.default


def _kind(f: dataclasses.Field, annotation: Any) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if list in args:
        return "files", optional
    if f.metadata.get("choices"):
        return "choice", optional
    if base is bool:
        return ("auto_bool" if optional else "bool"), optional
    return {int: "int", float: "float"}.get(base, "text"), optional


def option_fields(cls: type | None = None) -> list[OptionField]:
    """Every option of `cls` (TrainConfig) the studio shows, in documentation order."""
    found = []
    cls = cls or options_module.TrainConfig
    hints = typing.get_type_hints(cls)  # real types, also where a module wrote its annotations as strings
    for section, group in options_module.section_of(cls):
        for f in group:
            if f.name in RUN_OWNED:
                continue
            kind, optional = _kind(f, hints[f.name])
            meta = f.metadata
            found.append(OptionField(f.name, section, kind, f.default, tuple(meta.get("choices") or ()),
                                     meta.get("minimum"), meta.get("maximum"), meta.get("above"), optional,
                                     meta.get("help", ""), meta.get("help_zh", "")))
    return found


def _given(field: OptionField, value: Any) -> tuple[bool, Any]:
    """(whether the form sets this option, the value as a config file would hold it)."""
    if value is None:
        return False, None
    if field.kind == "auto_bool":
        return (value != AUTO), (value == "true" or value is True)
    if field.kind == "choice" and field.optional and value == AUTO:
        return False, None
    if field.kind in ("int", "float", "text", "files"):
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                return False, None
        if field.kind == "files" and isinstance(value, str):
            parts = [p.strip() for p in value.replace("\n", ",").split(",") if p.strip()]
            value = parts[0] if len(parts) == 1 else parts
        if field.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
    if field.kind == "choice" and isinstance(value, str) and all(isinstance(c, int) for c in field.choices):
        value = int(value) if value.lstrip("-").isdigit() else value  # a choice of numbers (quantization_bit)
    return value != field.default, value


def given_options(values: dict[str, Any], fields_: list[OptionField] | None = None) -> dict[str, Any]:
    """The options the form sets away from their defaults, by name (what a config file or flags would say)."""
    out = {}
    for f in fields_ or option_fields():
        if f.name in values:
            differs, value = _given(f, values[f.name])
            if differs:
                out[f.name] = value
    if "pre_seq_len" in out and "method" not in out and "method" in values:
        out["method"] = values["method"]  # the form shows its method: pre_seq_len alone would read as ptuning
    return out


def config_of(options: dict[str, Any]):
    """The TrainConfig these options give, checked as `glmtune train` checks them (GlmtuneError otherwise)."""
    return options_module.build_config(options_module.TrainConfig, [("studio", options)])


def form_values(options: dict[str, Any], fields_: list[OptionField] | None = None) -> dict[str, Any]:
    """Each field's form value for a mapping of options (a loaded YAML, a preset): unset ones at their default."""
    unknown = set(options) - {f.name for f in fields(options_module.TrainConfig)}
    if unknown:
        raise GlmtuneError(f"unknown option {sorted(unknown)[0]!r}")
    values = {}
    for f in fields_ or option_fields():
        value = options.get(f.name, f.default)
        if f.kind == "auto_bool":
            values[f.name] = AUTO if value is None else ("true" if value else "false")
        elif f.kind == "choice" and value is None:
            values[f.name] = AUTO
        elif f.kind == "files" and isinstance(value, list):
            values[f.name] = ", ".join(map(str, value))
        elif value is None:
            values[f.name] = f.empty()
        else:
            values[f.name] = value
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command_words(config) -> list[str]:
    """The `glmtune train` flags that give `config` from the defaults (every option that differs from its
    default, the run-owned ones left out): one word list, run without a shell."""
    words = []
    for f in _documentation_order(type(config)):
        value = getattr(config, f.name)
        if f.name in RUN_OWNED or value == f.default:
            continue
        if f.name == "pre_seq_len" and config.method == "lora":
            words += ["--method", "lora"]  # pre_seq_len alone reads as method ptuning, as the official scripts do
        if isinstance(value, bool):
            words.append(_flag(f.name) if value else f"--no-{f.name.replace('_', '-')}")
        elif value is None:
            words += [_flag(f.name), "none"]
        elif isinstance(value, list):
            words += [_flag(f.name), *map(str, value)]
        else:
            words += [_flag(f.name), str(value)]
    return words


def yaml_text(options: dict[str, Any]) -> str:
    """The options as a config file `glmtune train FILE` reads, in documentation order."""
    import yaml

    order = [f.name for f in _documentation_order(options_module.TrainConfig)]
    ordered = {name: options[name] for name in order if name in options}
    return yaml.safe_dump(ordered, allow_unicode=True, sort_keys=False, default_flow_style=False)


def _documentation_order(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` in the order docs/training.md lists them (model, data, method, training)."""
    return [f for _, group in options_module.section_of(cls) for f in group]
