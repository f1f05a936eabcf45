#!/usr/bin/env python
"""`make reproduce` and `make reproduce-smoke`: each table a Hydra multirun, then its report.

    python scripts/reproduce.py [--cifar10 ROOT] [--imagenet ROOT] [--tables NAME,...]
                                [--epochs N] [--partner-epochs N] [--seeds 0,1,2]
                                [--outputs DIR] [--dry-run] [-- OVERRIDE ...]
    python scripts/reproduce.py --smoke [...]

A table is an experiment config (conf/experiment/<table>.yaml). For each table:

    python -m bqat.train -m experiment=<table> [data.root=ROOT] bits=4,3,2 schedule=none,prefix
        hydra.sweep.dir=<outputs>/reproduce/<table>
    python scripts/report.py <outputs>/reproduce/<table> --name <table> --out <outputs>/reports

A table whose data root is not given is skipped with a one-line notice. Run folders are
named by their command (conf/train.yaml `run_name`), so re-running the same command finds
them: a cell whose metrics.json reached the configured epochs is not launched again, and
an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this clone's bqat, whichever bqat the environment has installed
CONF = ROOT / "conf"
OUTPUTS = ROOT / "outputs"  # conf/train.yaml's outputs folder (partner cache included)

BITS = ("4", "3", "2")
SCHEDULES = ("none", "prefix")
# Overrides that do not change what a run computes (conf/train.yaml excludes them from run_name).
NOT_IDENTITY = {"resume", "trainer.progress", "hydra/launcher"}


@dataclass(frozen=True)
class Table:
    name: str  # the experiment config, and the report's name
    dataset: str | None  # the data root it needs (--cifar10 / --imagenet); None: embedded data


TABLES = (
    Table("cifar10_resnet20", "cifar10"),
    Table("imagenet_resnet18", "imagenet"),
    Table("imagenet_resnet34", "imagenet"),
    Table("imagenet_resnet50", "imagenet"),
    Table("imagenet_mobilenetv2", "imagenet"),
)
SMOKE = Table("smoke", None)
ROOT_OPTION = {"cifar10": ("--cifar10", "CIFAR10"), "imagenet": ("--imagenet", "IMAGENET")}


def say(message: str) -> None:
    print(f"reproduce: {message}", flush=True)


# ---------------------------------------------------------------- cells and their run folders


def parse_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.strip(), value.strip().strip("'\"")


def identity(overrides) -> dict[str, str]:
    """The overrides that decide what a run computes, quotes dropped (`bits='2'` == `bits=2`)."""
    pairs = (parse_override(o) for o in overrides)
    return {k: v for k, v in pairs if k not in NOT_IDENTITY}


def cell_overrides(common: list[str], bits: str, schedule: str, seed: str | None) -> list[str]:
    return [*common, f"bits={bits}", f"schedule={schedule}"] + ([f"seed={seed}"] if seed is not None else [])


def finished_runs(sweep_dir: Path) -> list[dict[str, str]]:
    """Identities of the runs under `sweep_dir` whose metrics.json reached their configured epochs."""
    done = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        metrics_file, config_file = run_dir / "metrics.json", run_dir / ".hydra" / "config.yaml"
        if not (metrics_file.is_file() and config_file.is_file()):
            continue
        try:
            metrics = json.loads(metrics_file.read_text())
            epochs = yaml.safe_load(config_file.read_text())["trainer"]["epochs"]
            overrides = yaml.safe_load(overrides_file.read_text()) or []
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            continue  # unreadable: treat as not finished, the run resumes or rewrites it
        if metrics.get("epoch") == epochs:
            done.append(identity(overrides))
    return done


def plan(common: list[str], seeds: list[str] | None, done: list[dict]) -> tuple[list[tuple], int]:
    """Multiruns covering every unfinished cell: [(bits, schedules, seeds)], and the number finished.

    Cells are grouped back into Cartesian products (usually one), so a table is a single
    Hydra multirun unless some of its cells finished earlier.
    """
    seed_values = seeds or [None]
    todo = [
        (b, s, seed) for b, s, seed in itertools.product(BITS, SCHEDULES, seed_values)
        if identity(cell_overrides(common, b, s, seed)) not in done
    ]
    n_done = len(BITS) * len(SCHEDULES) * len(seed_values) - len(todo)
    schedules_of = defaultdict(list)  # (bits, seed) -> schedules
    for b, s, seed in todo:
        schedules_of[(b, seed)].append(s)
    bits_of = defaultdict(list)  # (schedules, seed) -> bits
    for (b, seed), scheds in schedules_of.items():
        bits_of[(tuple(scheds), seed)].append(b)
    seeds_of = defaultdict(list)  # (bits, schedules) -> seeds
    for (scheds, seed), bits in bits_of.items():
        seeds_of[(tuple(bits), scheds)].append(seed)
    return [(bits, scheds, tuple(s)) for (bits, scheds), s in seeds_of.items()], n_done


# ---------------------------------------------------------------- one table


def common_overrides(table: Table, root: str | None, args) -> list[str]:
    out = [f"experiment={table.name}"]
    if root is not None:
        out.append(f"data.root={root}")
    if args.epochs is not None:
        out.append(f"trainer.epochs={args.epochs}")
    if args.partner_epochs is not None:
        out.append(f"partner.epochs={args.partner_epochs}")
    if args.outputs != OUTPUTS:
        out.append(f"partner.cache_dir={args.outputs / 'partners'}")
    return out + list(args.overrides)


def check_composes(overrides: list[str]) -> str | None:
    """None if Hydra composes the table's config, else the first line of its complaint."""
    from hydra import compose, initialize_config_dir

    import bqat.config  # noqa: F401  (run_name's resolver)

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="train", overrides=overrides)
    except Exception as err:  # noqa: BLE001 - any composition failure is reported in one line
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__
    return None


def run_table(table: Table, root: str | None, args) -> bool:
    """Train the table's unfinished cells, then write its report. False if something failed."""
    if root is not None and not Path(root).exists():
        say(f"{table.name}: data root {root} does not exist; give the folder that holds the dataset")
        return False
    common = common_overrides(table, root, args)
    problem = check_composes(common)
    if problem:
        say(f"{table.name}: cannot compose experiment={table.name}: {problem}")
        return False

    sweep_dir = args.outputs / "reproduce" / table.name
    launches, n_done = plan(common, args.seeds, finished_runs(sweep_dir))
    n_cells = len(BITS) * len(SCHEDULES) * len(args.seeds or [None])
    say(f"{table.name}: {n_cells} cells, {n_done} already finished, {len(launches)} multirun(s) to launch")
    ok = True
    for bits, schedules, seeds in launches:
        cmd = [sys.executable, "-m", "bqat.train", "-m", *common, f"bits={','.join(bits)}",
               f"schedule={','.join(schedules)}"]
        if seeds != (None,):
            cmd.append(f"seed={','.join(seeds)}")
        cmd += [f"hydra.sweep.dir={sweep_dir}", f"trainer.progress={str(sys.stdout.isatty()).lower()}"]
        say("$ " + " ".join(cmd[1:]))
        if args.dry_run:
            continue
        code = subprocess.run(cmd, cwd=ROOT).returncode
        if code != 0:
            say(f"{table.name}: bqat-train exited with {code} (its message is above); reporting what finished")
            ok = False

    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep_dir), "--name", table.name,
              "--out", str(args.outputs / "reports")]
    say("$ " + " ".join(report[1:]))
    if not args.dry_run and subprocess.run(report, cwd=ROOT).returncode != 0:
        ok = False
    return ok


# ---------------------------------------------------------------- entry point


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a usage mistake is one line, like every other bqat error
        self.exit(2, f"reproduce: error: {message} (see --help)\n")


def parse_args(argv):
    parser = OneLineParser(description="Reproduce bqat's tables: Hydra multiruns, then reports.")
    parser.add_argument("--smoke", action="store_true", help="only the smoke table: digits, tiny budget")
    parser.add_argument("--cifar10", metavar="ROOT", help="CIFAR-10 root (make variable CIFAR10)")
    parser.add_argument("--imagenet", metavar="ROOT", help="ImageNet root with train/ and val/ (make variable IMAGENET)")
    parser.add_argument("--tables", help="comma-separated table names to run (default: all)")
    parser.add_argument("--epochs", type=int, help="trainer.epochs for every cell (make variable EPOCHS)")
    parser.add_argument("--partner-epochs", type=int, help="partner.epochs when auto-training (PARTNER_EPOCHS)")
    parser.add_argument("--seeds", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help="comma-separated seeds, each cell once per seed (SEEDS); default: the config's seed")
    parser.add_argument("--outputs", type=Path, default=OUTPUTS, help="outputs folder (default: the clone's outputs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing (DRY=1)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell (ARGS), after --")
    args = parser.parse_args(argv)
    args.outputs = args.outputs.resolve()
    for o in args.overrides:
        if parse_override(o)[0].lstrip("+~") in {"bits", "schedule", "seed"}:
            parser.error(f"{o}: reproduce sets bits and schedule for every cell; give seeds with --seeds (SEEDS=)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        tables, roots = [SMOKE], {}
    else:
        wanted = set(args.tables.split(",")) if args.tables else {t.name for t in TABLES}
        unknown = wanted - {t.name for t in TABLES}
        if unknown:
            say(f"unknown table(s) {', '.join(sorted(unknown))}; choose from {', '.join(t.name for t in TABLES)}")
            return 2
        tables = [t for t in TABLES if t.name in wanted]
        roots = {"cifar10": args.cifar10, "imagenet": args.imagenet}

    ok, ran = True, 0
    for table in tables:
        root = roots.get(table.dataset) if table.dataset else None
        root = os.path.abspath(root) if root else None  # training runs from the clone's root
        if table.dataset and not root:
            option, variable = ROOT_OPTION[table.dataset]
            say(f"skipping {table.name}: no {table.dataset} data root given ({variable}=<path> for make, {option} here)")
            continue
        ran += 1
        ok = run_table(table, root, args) and ok
    if ran == 0:
        say("no table ran: give a data root (make reproduce CIFAR10=<path> IMAGENET=<path>) or run make reproduce-smoke")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
