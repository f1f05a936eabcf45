"""Sweeps through Hydra's launcher plugins, and `-m ... --cfg` to inspect one.

`hydra/launcher=joblib` (parallel local runs) and `hydra/launcher=submitit_slurm` (one
SLURM array per sweep) come from Hydra's official plugins; bqat adds nothing to them but
this: Hydra 1.3 refuses `--cfg` together with `-m`, yet "what will the launcher get?" is
the question to ask before submitting a sweep. `show_sweep_config` answers it by composing
the config the way a sweep does (MULTIRUN mode, the sweep's values left to the sweeper)
and printing it like `--cfg` does.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf, flag_override


def _parse(argv: list[str]):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-m", "--multirun", action="store_true")
    p.add_argument("-c", "--cfg", choices=["job", "hydra", "all"])
    p.add_argument("-p", "--package")
    p.add_argument("--resolve", action="store_true")
    return p.parse_known_args(argv)


def show_sweep_config(argv: list[str], config_dir: str, config_name: str = "train", job_name: str = "train") -> bool:
    """Print the sweep's config for `-m ... --cfg job|hydra|all`; False if argv is not that."""
    try:
        args, rest = _parse(argv)
    except SystemExit:
        return False
    if not (args.multirun and args.cfg) or any(a.startswith("-") for a in rest):
        return False
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name=job_name):
        loader = GlobalHydra.instance().config_loader()
        try:
            cfg = loader.load_configuration(config_name, [*rest, "hydra.mode=MULTIRUN"], run_mode=RunMode.MULTIRUN)
        except (HydraException, OmegaConfBaseException) as err:
            print(f"bqat-train: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        HydraConfig.instance().set_config(cfg)
        with flag_override(cfg, ["struct", "readonly"], [False, False]), flag_override(cfg.hydra, ["struct", "readonly"], [False, False]):
            if args.cfg == "job":
                del cfg["hydra"]
            elif args.cfg == "hydra":
                for key in [k for k in cfg if k != "hydra"]:
                    del cfg[key]
                for key in ("help", "hydra_help"):  # as Hydra's own --cfg hydra
                    del cfg.hydra[key]
        out = OmegaConf.select(cfg, args.package) if args.package and args.package != "_global_" else cfg
        if out is None:
            sys.stderr.write(f"package '{args.package}' not found in config\n")
            sys.exit(1)
        if args.resolve and OmegaConf.is_config(out):
            OmegaConf.resolve(out)
        sys.stdout.write(OmegaConf.to_yaml(out) if OmegaConf.is_config(out) else f"{out}\n")
    return True
