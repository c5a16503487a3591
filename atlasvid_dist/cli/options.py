"""The command line's options, derived from the config dataclasses: one default, one help text, one set of choices.

Each option names the dataclass field it sets (:data:`OPTIONS`); its default, the kind of value a --config file
may give it, its choices (a ``Literal`` type) and its help (the field's docstring) are read from that field
(config/fields.py). Only what the command line means differently is written here: an option named otherwise than
its field (``--attention`` sets ``AtlasConfig.mode``), a default that is a rule (``--window auto``), or help for
options that set no field (``--res``). ``generate`` and ``plan`` build their options with :func:`option`, so a
default changed in a dataclass is the default of both commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer

from ..config.fields import MISSING, config_fields
from ..config.generate import GenerateConfig
from ..config.method import AtlasConfig
from ..config.parallel import ParallelPlan
from ..config.video import DEFAULT_RES, RESOLUTION_PRESETS, VideoSpec
from ..cost.model import RunSettings

#: Help panels of ``--help``, in the order shown.
VIDEO, METHOD, MODEL, RUN, DISTRIBUTED, OUTPUT = "Video", "Method", "Model", "Run", "Distributed", "Output"

_FIELD = object()  # "read it from the field"


@dataclass(frozen=True)
class Opt:
    """One option: the field it sets and what the command line says differently about it."""

    name: str
    """Option name with underscores (``--proxy-steps`` is ``proxy_steps``; the key in a --config file)."""
    panel: str
    source: type | None = None
    """The config dataclass whose field the option sets (None: the option sets no field, e.g. ``res``)."""
    field: str | None = None
    """The field's name when it is not the option's."""
    default: Any = _FIELD
    """The command line's default when it is not the field's (e.g. 'auto' for a rule the CLI applies)."""
    help: str | None = None
    """Help when the field's docstring does not fit the command line."""
    note: str = ""
    """Appended to the help (what only the command line does)."""
    shown: str | None = None
    """How the default is shown, when its value is too long to show (the negative prompt)."""
    kind: str | None = None
    """The --config value kind when there is no field to read it from."""
    decls: tuple[str, ...] = ()
    """typer parameter declarations (a boolean's '--shift/--no-shift')."""

    @property
    def cli_rule(self) -> bool:
        """True when the command line's default is not its field's (a rule the command line applies)."""
        return self.source is not None and self.default is not _FIELD

    @property
    def info(self):
        return config_fields(self.source)[self.field or self.name] if self.source is not None else None

    @property
    def value(self) -> Any:
        """The default value (None when there is none)."""
        if self.default is not _FIELD:
            return self.default
        d = self.info.default if self.info is not None else MISSING
        return None if d is MISSING else d

    @property
    def value_kind(self) -> str | None:
        return self.kind or (self.info.kind if self.info is not None else None)

    @property
    def choices(self) -> tuple | None:
        return self.info.choices if self.info is not None else None

    def help_text(self) -> str:
        text = self.help or (self.info.doc if self.info is not None else "").replace("``", "")
        if self.choices and self.help is None:
            text += f" One of: {'|'.join(map(str, self.choices))}."
        return f"{text} {self.note}".strip()

    def default_text(self) -> str:
        """The default as the help shows it: a triple as T,H,W, a boolean as its flag, None as 'none'."""
        if self.shown is not None:
            return self.shown
        v = self.value
        if isinstance(v, tuple):
            return ",".join(map(str, v))
        if isinstance(v, bool):
            if self.decls and "/" in self.decls[0]:
                on, off = self.decls[0].split("/")
                return (on if v else off).lstrip("-")
            return "on" if v else "off"
        if v is None:
            return "none"
        return str(v)

    def cli_value(self) -> Any:
        """The default as the command line would give it (a triple as a 'T,H,W' text)."""
        v = self.value
        return ",".join(map(str, v)) if isinstance(v, tuple) and self.value_kind == "triple" else v


def _opts(*opts: Opt) -> dict[str, Opt]:
    return {o.name: o for o in opts}


_G, _A, _V, _P, _R = GenerateConfig, AtlasConfig, VideoSpec, ParallelPlan, RunSettings

OPTIONS: dict[str, Opt] = _opts(
    # video
    Opt(
        "res",
        VIDEO,
        default=DEFAULT_RES,
        kind="str",
        help=f"{'|'.join(RESOLUTION_PRESETS)} or WIDTHxHEIGHT (pixels, multiples of 16; 1080p pads to 1088 and crops).",
    ),
    Opt("frames", VIDEO, _V),
    Opt("fps", VIDEO, _V),
    # method
    Opt("attention", METHOD, _A, field="mode"),
    Opt(
        "window",
        METHOD,
        _A,
        default="auto",
        help="Window in tokens T,H,W (1 token = 4 frames x 16 x 16 px), or auto: near 3,15,16 and tiling the size "
        "(3,15,16 at 720P/2K/4K/8K).",
    ),
    Opt("shift", METHOD, _A, decls=("--shift/--no-shift",)),
    Opt("shift_axes", METHOD, _A),
    Opt("pad_windows", METHOD, _A, decls=("--pad-windows/--no-pad-windows",)),
    Opt("temporal_scale", METHOD, _A),
    Opt(
        "spatial_scale",
        METHOD,
        _A,
        default=0,
        help="Detail tokens per proxy token in height and width; 0 = auto (the smallest divisor giving a proxy "
        "frame of at most 720P: 4K -> 3, 2K -> 2, 8K -> 6).",
    ),
    Opt("proxy_context", METHOD, _A),
    Opt("proxy_margin", METHOD, _A, note="As T,H,W."),
    Opt("proxy_mode", METHOD, _A, note="With --workers: joint runs the proxy on every rank."),
    Opt("max_window_batch", METHOD, _A),
    Opt("backend", METHOD, _A),
    Opt("ultragen_pool", METHOD, _A, note="With --attention ultragen; as T,H,W."),
    Opt("ultragen_weight", METHOD, _A, note="With --attention ultragen."),
    Opt("schedule", METHOD, _A),  # --config only (a list of (window, shift) pairs)
    # model
    Opt("model", MODEL, _G),
    Opt("lora_stage1", MODEL, _G),
    Opt("lora_stage2", MODEL, _G),
    Opt("dtype", MODEL, _G),
    Opt("text_len", MODEL, _G),
    # run
    Opt("prompt", RUN, _G, note="Required (here or in --config)."),
    Opt("negative_prompt", RUN, _G, shown="Wan2.1's own (README)"),
    Opt("steps", RUN, _G),
    Opt("proxy_steps", RUN, _G),
    Opt("guidance", RUN, _G),
    Opt("flow_shift", RUN, _G),
    Opt("proxy_flow_shift", RUN, _G),
    Opt("seed", RUN, _G),
    Opt("detail_init", RUN, _G),
    Opt("init_strength", RUN, _G),
    Opt("detail_cfg_until", RUN, _G),
    Opt("detail_reuse", RUN, _G),
    Opt("ffn_chunk", RUN, _G),
    Opt("offload_encoders", RUN, _G, decls=("--offload-encoders",)),
    Opt("host_mmap_threshold", RUN, _G),
    Opt("compile_blocks", RUN, _G, decls=("--compile-blocks",)),
    Opt("device", RUN, _G),
    Opt("device_profile", RUN, _G),
    # distributed
    Opt("proxy_parallel", DISTRIBUTED, _P),
    Opt("window_group", DISTRIBUTED, _P),
    Opt("window_parallel", DISTRIBUTED, _P),
    Opt("window_order", DISTRIBUTED, _P),
    Opt("shift_exchange", DISTRIBUTED, _P),
    Opt("gpus_per_node", DISTRIBUTED, _P),  # plan only
    # output
    Opt("out", OUTPUT, _G),
    Opt("save_proxy", OUTPUT, _G),
    Opt("save_latents", OUTPUT, _G),
    Opt("crf", OUTPUT, _G),
    Opt("run_dir", OUTPUT, _G, note="Continue it with --resume."),
    Opt("decode_tile", OUTPUT, _G),
    Opt("decode_overlap", OUTPUT, _G),
    Opt("decode_batch", OUTPUT, _G),
    Opt("decode_order", OUTPUT, _G),
)


def option(name: str, *decls: str, cli_default: bool = False, note: str = "", **kw) -> Any:
    """The typer option of ``name``: its help (ending in its default), its help panel and its declarations.

    ``cli_default=False`` (generate): the option's value is None when not given, so that a --config file can set
    what the command line does not; :data:`DEFAULTS` fills in the rest. ``cli_default=True`` (plan, no --config):
    the option's value defaults to the default itself. ``note`` is appended to the help (what this command does
    differently); ``decls`` replace the option's declarations (e.g. a flag named otherwise than the parameter);
    ``kw`` go to ``typer.Option``."""
    o = OPTIONS[name]
    return typer.Option(
        o.cli_value() if cli_default else None,
        *(decls or o.decls),
        help=with_default(f"{o.help_text()} {note}".strip(), o.default_text()),
        rich_help_panel=o.panel,
        show_default=False,
        **kw,
    )


def with_default(help: str, default: str) -> str:
    """``help`` ending in ``[default: ...]`` (typer's own words), escaped for Rich markup: the app's help is
    Rich-formatted (panels), and unescaped, Rich would take '[default: x]' for a style tag and drop it."""
    from rich.markup import escape

    return escape(f"{help} [default: {default}]")


#: The default of every setting of a run (option names, the command line's values), the one table generate and the
#: Python API fill in under a --config file and the command line.
DEFAULTS: dict[str, Any] = {
    name: o.cli_value() for name, o in OPTIONS.items() if o.source in (None, GenerateConfig, AtlasConfig, VideoSpec)
}

#: The kind of value every option takes in a --config file (the command line's parser already enforces them).
OPTION_KINDS: dict[str, str] = {name: kind for name in DEFAULTS if (kind := OPTIONS[name].value_kind) is not None}
