"""Metrics files written by every notebook.

Schema (one JSON object per notebook, keys sorted, stable across runs with the same seed):

    {
      "notebook": "01_c2c", "profile": "mini", "seed": 0,
      "library_version": "0.1.0",
      "machine": {...},                    # CPU, the float kernels torch uses, versions
      "parameters": {...},                 # the notebook's papermill parameters
      "<metric groups>": {...},            # accuracies as {"value", "n", "ci95": [lo, hi]}
      "timings": {"<stage>": seconds, ...} # wall times of the notebook's stages
      "measured_seconds": {...}            # wall-clock results (e.g. latency per query)
    }

``timings`` and ``measured_seconds`` are the only keys that vary from run to run on one
machine. Across machines the numbers may differ: training on the CPU is deterministic, but
torch picks its float kernels by the CPU's vector instructions (AVX2, AVX-512, ...), and a
different rounding early in pretraining gives another world. ``machine`` records which.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .models import REPO_ROOT, profile_models
from .stats import Difference, Estimate, gap_closed

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

TIMING_KEYS = ("timings", "measured_seconds")
"""Top-level keys holding wall-clock numbers (excluded when comparing two runs)."""


@functools.cache
def parameter_names(notebook: Path) -> tuple[str, ...]:
    """The names a notebook's tagged ``parameters`` cell assigns, in order."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{notebook} has {len(tagged)} cells tagged 'parameters'; papermill needs exactly one.")
    tree = ast.parse("".join(tagged[0]["source"]))
    return tuple(
        t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    )


def notebook_params(notebook: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """A notebook's parameters as it runs: every name of its ``parameters`` cell (read from
    ``notebooks/<notebook>.ipynb``, the one place they are written), valued from ``namespace``
    (the notebook's ``globals()``, after papermill's injected values)."""
    names = parameter_names(NOTEBOOKS_DIR / f"{notebook}.ipynb")
    missing = [n for n in names if n not in namespace]
    if missing:
        raise NameError(
            f"Parameters {missing} of {notebook} are not defined: run the notebook's parameters cell first."
        )
    params = {n: namespace[n] for n in names}
    check_parameters(notebook, params)
    return params


def _whole(low: int, optional: bool = False) -> Callable[[Any], bool]:
    return lambda v: (optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= low)


def _number(low: float, strict: bool, optional: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if optional and v is None:
            return True
        real = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return real and (v > low if strict else v >= low)

    return ok


#: Parameter name -> (test, what is allowed): the notebooks' shared parameters.
PARAMETER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "profile": (lambda v: isinstance(v, str) and bool(v), "a profile name (configs/<profile>.yaml)"),
    "seed": (_whole(0), "an int >= 0"),
    "smoke": (lambda v: isinstance(v, bool), "True or False"),
    "eval_limit": (_whole(1, optional=True), "None (every question) or an int >= 1"),
    "fuser_hidden": (_whole(1, optional=True), "None (the profile's) or an int >= 1"),
    "gate_hidden": (_whole(1, optional=True), "None (the profile's) or an int >= 1"),
    "train_epochs": (_number(0, strict=True, optional=True), "None (the profile's) or a number > 0"),
    "train_steps": (_whole(1, optional=True), "None (no cap) or an int >= 1"),
    "fuser_seed": (_whole(0, optional=True), "None (the profile's train.seed) or an int >= 0"),
    "bandwidth_mbps": (_number(0, strict=True), "a number > 0 (Mbit/s)"),
    "rtt_ms": (_number(0, strict=False), "a number >= 0 (ms)"),
    **{k: (_number(0, strict=True), "a number > 0") for k in ("budget_ms", "budget_low_ms", "budget_high_ms")},
    **{k: (_number(0, strict=True), "a number > 0 (Mbit/s)") for k in ("bandwidth_low_mbps", "bandwidth_high_mbps")},
    "trace_requests": (_whole(1), "an int >= 1"),
    "real_queries": (_whole(1), "an int >= 1"),
}


def check_parameters(notebook: str, params: Mapping[str, Any]) -> None:
    """Refuse, before any work, a parameter outside what :data:`PARAMETER_RULES` allows, a model
    pair of one model with itself, an unknown profile and a model the profile does not define
    (:data:`MODEL_PARAMETERS`); the error names the parameter, value and fix."""
    for name, value in params.items():
        if name in PARAMETER_RULES and not PARAMETER_RULES[name][0](value):
            raise ValueError(f"{notebook}: parameter {name}={value!r} is not allowed; use {PARAMETER_RULES[name][1]}.")
    for first, second in (("receiver_name", "sender_name"), ("model_a", "model_b")):
        if params.get(first) is not None and params.get(first) == params.get(second):
            raise ValueError(
                f"{notebook}: {first} and {second} are both {params[first]!r}; a pair needs two different models."
            )
    if "profile" in params:
        _check_model_names(notebook, params)


MODEL_PARAMETERS = ("receiver_name", "sender_name", "model_a", "model_b", "homogeneous_pair")
"""Parameters naming models of the profile (``homogeneous_pair``: a list of two, sender and receiver)."""


def _check_model_names(notebook: str, params: Mapping[str, Any]) -> None:
    """Refuse a profile that does not exist, and a model parameter naming a model the profile
    does not define, naming the parameter, the value and the profile's models."""
    profile = params["profile"]
    try:
        known = profile_models(profile)
    except FileNotFoundError as err:
        raise ValueError(f"{notebook}: parameter profile={profile!r} is not allowed: {err}") from err
    for name in MODEL_PARAMETERS:
        value = params.get(name)
        if value is None:
            continue
        many = name == "homogeneous_pair"
        values = list(value) if many and isinstance(value, (list, tuple)) else [value]
        if many and (len(values) != 2 or values[0] == values[1]):
            raise ValueError(f"{notebook}: parameter {name}={value!r} is not allowed; use two different model names.")
        if unknown := [v for v in values if not isinstance(v, str) or v not in known]:
            raise ValueError(
                f"{notebook}: parameter {name}={value!r} names {unknown}, not a model of profile {profile!r}; use "
                f"one of {known}" + (" (or None: the profile's choice)." if not many else ".")
            )


def to_jsonable(value: Any) -> Any:
    """Accuracy-like objects become ``{"value", "n", "ci95"}``; tensors and numpy become lists."""
    if hasattr(value, "ci_low") and hasattr(value, "value") and hasattr(value, "n"):
        return {"value": _num(value.value), "n": int(value.n), "ci95": [_num(value.ci_low), _num(value.ci_high)]}
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return _num(value)
    return value


def machine() -> dict[str, str]:
    """What the float results of a run depend on besides the seed: the CPU model, the vector
    instructions torch dispatches to, and the torch and transformers versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


class RunRecord:
    """Collects one notebook's metrics and stage timings, then writes the JSON file."""

    def __init__(self, notebook: str, profile: str, seed: int, parameters: dict[str, Any]):
        self.data: dict[str, Any] = {
            "notebook": notebook,
            "profile": profile,
            "seed": seed,
            "library_version": __version__,
            "machine": machine(),
            "parameters": to_jsonable(parameters),
            "timings": {},
        }
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block; its wall time goes to ``timings[name]`` (accumulating)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings = self.data["timings"]
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)

    def put(self, key: str, value: Any) -> Any:
        """Set a dotted key, e.g. ``put("accuracy.c2c", acc)``; returns ``value``."""
        node = self.data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = to_jsonable(value)
        return value

    def get(self, key: str) -> Any:
        node = self.data
        for p in key.split("."):
            node = node[p]
        return node

    def save(self, path: str | Path) -> Path:
        """Write the metrics (with total wall time) as sorted, indented JSON."""
        self.data["timings"]["total"] = round(time.perf_counter() - self._start, 3)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        return path


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of a metrics file that must be identical across runs with the same seed."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def summarize(result, focus: list[str] | None = None) -> dict[str, Any]:
    """Accuracy of an ``evaluate.McqResult`` overall, on the ``focus`` domains (``"focus"``;
    every item when ``focus`` is empty or None: nothing says where a sender can help), and per
    domain (cluster-bootstrap intervals over entities)."""
    out = {"all": result.accuracy(), "by_domain": result.accuracy_by("domain")}
    out["focus"] = result.where(focus).accuracy() if focus else out["all"]
    return out


def closed_gap(base, method, upper) -> Estimate:
    """Share of the ``base`` -> ``upper`` gap (e.g. receiver alone -> oracle) that ``method``
    closes, on the same items, with a paired cluster-bootstrap interval (``McqResult``s)."""
    for r in (method, upper):
        if r.ids != base.ids:
            raise ValueError("closed_gap needs three results on the same items in the same order.")
    return gap_closed(base.correct, method.correct, upper.correct, base.cluster_labels())


def differences(results: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, Difference]:
    """``"a - b"`` -> the paired difference of ``results[a]`` and ``results[b]``
    (``McqResult.compare``: cluster bootstrap interval and p-value, McNemar's p)."""
    return {f"{a} - {b}": results[a].compare(results[b]) for a, b in pairs}
