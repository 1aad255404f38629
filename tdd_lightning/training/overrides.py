"""Command-line overrides checked before Hydra runs: an unknown key gets the valid keys and a did-you-mean.

Hydra answers ``target_selection.sratio=0.2`` with advice to append the key with ``+``, which is the wrong
advice for a typo. ``precheck`` composes the config the way Hydra will (sweeps by their first value) and
turns that failure into one line naming the keys the node does have.
"""

from __future__ import annotations

from collections.abc import Sequence

from tdd_lightning.errors import UserError

# Hydra flags that change what is composed: the precheck leaves such command lines to Hydra alone
_SKIP_PRECHECK = {
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def overrides_from_argv(argv: Sequence[str]) -> list[str] | None:
    """The override arguments of a train.py command line (None: a flag we leave to Hydra alone).

    Flags (``--cfg``, ``-m``, ...) and their bare-word values (``job``) are not overrides: an override
    always holds ``=`` or starts with ``~``.
    """
    out = []
    for arg in argv:
        if arg.split("=", 1)[0] in _SKIP_PRECHECK:
            return None
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        out.append(arg)
    return out


def first_of_sweeps(overrides: Sequence[str]) -> list[str]:
    """Each sweep override (``k=a,b``, ``range(...)``) replaced by its first value; hydra.* dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element()
        if key.lstrip("+~").startswith(("hydra.", "hydra/")) or key.lstrip("+~") == "hydra":
            continue
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is None:
                continue
            out.append(f"{key}={first}")
        else:
            out.append(o.input_line)
    return out


def compose(config_dir: str, config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def precheck(argv: Sequence[str], config_dir: str, config_name: str) -> None:
    """Raise UserError for an override of a key the config does not have; leave everything else to Hydra."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from tdd_lightning.training.config_checks import unknown_key_message

    overrides = overrides_from_argv(argv)
    if not overrides:
        return
    try:
        overrides = first_of_sweeps(overrides)
        compose(config_dir, config_name, overrides)
        return
    except ConfigCompositionException as e:
        cause = e.__cause__
        if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return  # Hydra's own message is the right one (a missing option, a syntax error, ...)
        full_key = str(getattr(cause, "full_key", "") or "")
    except Exception:
        return  # anything else: Hydra reports it as usual
    if not full_key:
        return
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != full_key]
    parent = full_key.rpartition(".")[0]
    try:
        cfg = compose(config_dir, config_name, rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:
        node = None
    raise UserError(unknown_key_message(full_key, node))
