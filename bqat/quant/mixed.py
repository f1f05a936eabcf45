"""Per-layer precision: `bits.layers`, an ordered mapping from module-name globs to widths.

    bits.layers:
      "layer1.*": {w: 4, a: 4}     # every quantizable layer under layer1
      "fc": {w: 8}                 # the classifier's weights; its input keeps its width

Each quantizable layer (Conv2d / Linear of the twin, named as in `model.named_modules()`)
starts from the uniform rules, `bits.w` / `bits.a`, then `bits.depthwise` and
`bits.first_last`; then every pattern that matches its name (`fnmatch`, case-sensitive,
`*` also matches dots) sets the keys it gives, in order, so the last match wins. A width
is 2..8 or `fp` (that tensor stays float); a layer with both at `fp` stays a float layer.
A pattern that matches no quantizable layer is an error: it is almost always a typo.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from omegaconf import DictConfig, OmegaConf

from bqat.errors import UserError

KEYS = ("w", "a")
# The width of a tensor that stays float.
FP = None


def parse_width(value, where: str) -> int | None:
    """A width of bits.layers: an integer from 2 to 8, or `fp` (None)."""
    if isinstance(value, str) and value == "fp":
        return FP
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise UserError(f"{where} must be an integer from 2 to 8 or fp, got {value!r}")
    return int(value)


def layer_patterns(bits_cfg) -> list[tuple[str, dict[str, int | None]]]:
    """`bits.layers` as an ordered list of (glob, {"w": width, "a": width}) with only the keys given.

    Every value is checked here, so a bad entry fails in one line before anything is built.
    """
    layers = bits_cfg.get("layers") if bits_cfg is not None else None
    if layers is None:
        return []
    if isinstance(layers, DictConfig):
        layers = OmegaConf.to_container(layers, resolve=True)
    if not isinstance(layers, dict):
        raise UserError(f"bits.layers must map module-name globs to {{w: .., a: ..}}, e.g. "
                        f"'+bits.layers={{\"layer1.*\": {{w: 4, a: 4}}}}', got {layers!r}")
    out = []
    for pattern, spec in layers.items():
        where = f"bits.layers[{pattern!r}]"
        if not isinstance(spec, dict):
            raise UserError(f"{where} must be a mapping such as {{w: 4, a: 4}} (either key optional), got {spec!r}")
        unknown = sorted(set(map(str, spec)) - set(KEYS))
        if unknown:
            raise UserError(f"{where} has unknown key {unknown[0]!r}; give w (weights) and/or a (input activations)")
        if not spec:
            raise UserError(f"{where} sets neither w nor a; give w (weights) and/or a (input activations)")
        out.append((str(pattern), {k: parse_width(spec[k], f"{where}.{k}") for k in KEYS if k in spec}))
    return out


def apply_patterns(widths: dict[str, tuple[int | None, int | None]], patterns, model_name: str = "the model") -> dict:
    """`widths` (layer name -> (w, a) from the uniform rules) with every pattern applied in order.

    Raises UserError naming a pattern that matches none of the layers.
    """
    widths = dict(widths)
    for pattern, spec in patterns:
        hits = [name for name in widths if fnmatchcase(name, pattern)]
        if not hits:
            raise UserError(no_match(pattern, list(widths), model_name))
        for name in hits:
            w, a = widths[name]
            widths[name] = (spec.get("w", w), spec.get("a", a))
    return widths


def no_match(pattern: str, names: list[str], model_name: str) -> str:
    """The one line for a glob that matches no quantizable layer, with a few names to pick from."""
    if not names:
        return f"bits.layers pattern {pattern!r}: {model_name} has no quantizable layer"
    shown = names[:4] + (["...", names[-1]] if len(names) > 5 else names[4:])
    containers = sorted({n.rsplit(".", i)[0] for n in names for i in range(1, n.count(".") + 1)})
    hint = f" (to match the layers inside {pattern}, use '{pattern}.*')" if pattern in containers else ""
    return (f"bits.layers pattern {pattern!r} matches no quantizable layer of {model_name}{hint}; "
            f"its layers are named {', '.join(shown)} (fnmatch globs, * also matches dots)")


def describe(widths: dict[str, tuple[int | None, int | None]]) -> str:
    """`W2A2 x 18, W8A8 x 2` (float tensors as fp): a short summary of the twin's widths."""
    counts: dict[str, int] = {}
    for w, a in widths.values():
        key = f"W{'fp' if w is None else w}A{'fp' if a is None else a}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x {c}" for k, c in counts.items())
