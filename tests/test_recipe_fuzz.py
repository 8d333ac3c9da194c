"""Bad input found by a machine (issue 13, item 8): hypothesis mutates valid recipes and `--set` overrides and
checks that each mutation either validates or stops with one line naming the place: never a traceback, never a
run directory left behind. docs/reliability.md ("Bad input found by a machine") lists what is mutated.

Every example runs the real command, `kdflow train RECIPE --set ... --out DIR`, in this process, up to the first
training step: `train_epoch` is replaced by one that raises `Reached`, so a recipe that gets that far is valid
(everything before it has run: validation, the data, the models and their dry run, the run directory's header,
the optimizers, views and teacher caches) and nothing trains. The examples are derandomized (the same ones on
every run) and few enough for the whole file to take well under a minute on 2 busy CPU cores.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import io
import os
import re
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from conftest import SYNTH, make_teacher
from kdflow.cli import main
from kdflow.flow.recipe import merge, read_yaml
from kdflow.methods import METHODS

ENGINE = importlib.import_module("kdflow.engine.train")  # the module: `kdflow.engine.train` is also the function
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FUZZ = settings(
    max_examples=int(os.environ.get("KDFLOW_FUZZ_EXAMPLES", "120")),  # more for a deeper search by hand
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# an error line starts with its place: a path of recipe fields (`transfers.0.to:`, `nodes.student (...)`), a
# --set item or a tap; the path starts at a recipe field, or at the unknown key that was added
FIELDS = {"name", "description", "seed", "device", "data", "nodes", "supervise", "transfers", "stages", "train",
          "drop", "ensembles", "method", "presets"}
PLACE = re.compile(r"^(?:--set |tap |([^\s:.(]+)[^\s:]*(?::| \())")

# shrunk to the synthetic data set: 64 training samples of 1×8×8, one epoch, batches of 16
SMALL = {"data": {**SYNTH, "options": {**SYNTH["options"], "num_samples": 64}, "augment": {"crop_padding": 0}},
         "train": {"epochs": 1, "batch_size": 16}}

# What replaces a value. Sizes stay small or absurd: a width of 3000 would really be allocated (gigabytes), a
# width of 2**63 fails at once. No accelerator names (cuda, mps): whether they are valid depends on the machine.
VALUES = [
    None, True, False, 0, 1, 2, 7, -1, 2**31, 2**63, -(2**63), 10**30,
    0.5, -0.5, 1.5, 1e308, float("nan"), float("inf"), float("-inf"),
    "", "abc", "teacher", "student", "pupil", "pupil.logits", "teacher.stage9", "student.logits", "stage[7]",
    "all_stages", "kl", "kd", "main", "registry:nope", "/nonexistent/t.pt", ".",
    "cpu", "fp16", "bf16", "skip_step", "batch", "frozen",
    [], [1, 2], ["pupil"], [None], ["student"], [[]],
    {}, {"zz": 1}, {"name": "kd"}, {"value": "x"}, {"fuse": []}, {"group": ["student.stage1"]},
]
# fields the bases leave at their defaults, added with a value
OPTIONAL = [tuple(path.split(".")) for path in (
    "device description drop ensembles stages data.root data.limit data.test_limit data.imbalance data.noise "
    "data.validation data.augment.flip data.imbalance.ratio data.noise.rate data.noise.kind data.validation.size "
    "train.views train.teacher_cache train.teacher_cache.enabled train.teacher_cache.topk train.precision "
    "train.threads train.save_epochs train.on_nonfinite train.sync_bn train.channels_last train.eval_batch_size "
    "train.schedule.milestones train.schedule.warmup_epochs train.optim.nesterov nodes.student.optim "
    "nodes.student.optim.lr nodes.student.batch_norm nodes.student.init_seed nodes.student.role nodes.student.args "
    "nodes.student.args.width nodes.student.args.depth nodes.student.same_as supervise.student"
).split()]
# what a --set value can be (the text after '=', read as YAML)
TEXTS = ["1", "0", "-1", "2.5", "nan", ".nan", ".inf", "-.inf", "1e999", "9223372036854775808", "true", "null", "",
         "abc", "[", "]", "{", "{a: 1}", "[1, 2]", "[]", "{}", "'quoted", "a: b: c", "*alias", "&a",
         "!!python/object:os.system", "pupil.logits", "teacher", "kdd", "- 1", "\t", "cpu", "fp16"]


class Reached(Exception):
    """The run got to its first training step: the recipe is valid."""


def _reached(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module", autouse=True)
def stop_before_training(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ENGINE, "train_epoch", _reached)
        mp.setenv("KDFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))  # teacher caches
        mp.setenv("KDFLOW_TEACHERS", str(tmp_path_factory.mktemp("teachers")))  # `registry:KEY` checkpoints
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def shipped(*files: str, **extra) -> dict:
    raw: dict = {}
    for f in files:
        raw = merge(raw, read_yaml(RECIPES / f))
    return merge(merge(raw, SMALL), extra)


@pytest.fixture(scope="module")
def bases(workdir: Path) -> dict[str, dict]:
    """Valid recipes: the shipped ones (their pair, method and demo files) shrunk to the synthetic data, and the
    README's hand-written graph (a connector, a weight schedule, a stage list, label noise, a validation split)."""
    teacher = str(make_teacher(workdir / "teacher.pt", "convnet_l"))
    pair = {"nodes": {"teacher": {"checkpoint": teacher}}}
    return {
        "kd": shipped("fashion_mnist/pair.yaml", "methods/kd.yaml", **pair),
        "fitnet": shipped("fashion_mnist/pair.yaml", "methods/fitnet.yaml", **pair),
        "dml": shipped("fashion_mnist/pair.yaml", "methods/dml.yaml", **pair),
        "crd": shipped("fashion_mnist/pair.yaml", "methods/crd.yaml", **pair),  # a module criterion (memory banks)
        "reviewkd": shipped("fashion_mnist/pair.yaml", "methods/reviewkd.yaml", **pair),  # tap groups
        # the CIFAR-100 pair files' presets
        "dkd": shipped("fashion_mnist/pair.yaml", "methods/dkd.yaml", **pair,
                       presets={"dkd": {"args": {"beta": 2}}, "reviewkd": {"args": {"weight": 0.6}}}),
        "demo": shipped("fashion_mnist/demo.yaml"),
        "compare": shipped("mnist1d/compare.yaml", data={"options": {"shape": [1, 40]}}),
        "graph": merge(SMALL, {
            "name": "graph",
            "data": {"noise": {"rate": 0.1}, "validation": 0.25},
            "nodes": {"teacher": {"arch": "convnet_l", "checkpoint": teacher}, "student": {"arch": "convnet_s"}},
            "supervise": {"student": 0.1},
            "transfers": [
                {"from": "teacher.logits", "to": "student.logits", "criterion": "kd", "temperature": 4,
                 "weight": {"value": 0.9, "warmup_epochs": 1}},
                {"from": "teacher.stage2", "to": "student.stage2", "criterion": "hint", "connector": "conv1x1",
                 "weight": 10, "stages": ["main"]},
            ],
            "stages": [{"name": "main"}],
            "train": {"optim": {"lr": 0.05}, "schedule": {"kind": "cosine"}},
        }),
    }


def run_cli(raw: dict | None, sets: list[str], workdir: Path, recipe: Path | None = None) -> str | None:
    """`kdflow train` on `raw` (written to a file) with `sets`: None when it reaches training (valid), else the error
    line; asserts exit code 2, one line on stderr, and no run directory. Any exception (a traceback) fails."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    if recipe is None:
        recipe = folder / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = folder / "run"
    argv = ["train", str(recipe), "--out", str(out), "--no-progress"] + (["--set", *sets] if sets else [])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Reached:
        return None
    text = err.getvalue()
    assert code == 2, f"exit code {code}, stderr {text!r}"
    assert text.startswith("error: ") and text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    assert "Traceback" not in text
    assert not out.exists(), f"an error left a run directory: {text!r}"
    message = text.removeprefix("error: ").rstrip("\n")
    assert message.strip(), "an empty error"
    return message.removeprefix(f"{recipe}: ")


def assert_names_place(message: str, mentions: list[str]) -> None:
    """The line starts with a place (a recipe field's path, a --set item, a tap) and names what was changed."""
    place = PLACE.match(message)
    named = place and (place.group(1) is None or place.group(1) in FIELDS | set(mentions or ()))
    assert named, f"names no place: {message!r}"
    if mentions:
        assert any(m in message for m in mentions), f"names none of {mentions}: {message!r}"


def paths(obj, prefix=()):
    """Every path into a recipe, leaves and containers."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from paths(value, (*prefix, i))


def at(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def mentions_of(path: tuple, value=None) -> list[str]:
    out = [str(k) for k in path if isinstance(k, str) and k]
    if isinstance(value, str) and value:
        out.append(value)
    elif isinstance(value, str):
        out.append(repr(value))
    return out


def reshapes_the_graph(raw: dict, path: tuple | list, value) -> bool:
    """Whether setting `path` of `raw` to `value` chooses other methods or gives a method an argument of the right
    type: the method's graph changes (other nodes, other stages), and a fault may surface at any place of it (a
    stage that names a node the method no longer makes). A wrongly typed argument must be named itself."""
    if not path or path[0] != "method":
        return False
    if len(path) == 1 or path[-1] == "name":
        return True
    try:
        entry = at(raw, path[:-1])
    except (KeyError, IndexError, TypeError):  # a --set path through a list: refused as such
        return False
    if not isinstance(entry, dict) or entry.get("name") not in METHODS:
        return False
    hint = typing.get_type_hints(METHODS[entry["name"]].fn).get(path[-1])
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except (ValidationError, TypeError):
        return False
    return hint is not None


@st.composite
def mutated(draw, bases: dict[str, dict]):
    """A base recipe with one mutation: (recipe, the changed path, what the error line may name; None: anything)."""
    name = draw(st.sampled_from(sorted(bases)))
    raw = copy.deepcopy(bases[name])
    if isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}  # so that its arguments can be set
    kind = draw(st.sampled_from(["drop", "unknown", "value", "value", "add", "method_arg", "rename_node"]))
    # data.options are the data set's own keyword arguments, checked by its loader (not by the recipe schema)
    candidates = [p for p in paths(raw) if p and p[:2] != ("data", "options")]
    if kind == "method_arg":
        entries = raw["method"] if isinstance(raw.get("method"), list) else [raw["method"]] if "method" in raw else []
        if entries:
            entry = draw(st.sampled_from(entries))
            key = draw(st.sampled_from(list(inspect.signature(METHODS[entry["name"]].fn).parameters)))
            value = draw(st.sampled_from(VALUES))
            path = ("method", key) if isinstance(raw["method"], dict) else ("method", raw["method"].index(entry), key)
            reshapes = reshapes_the_graph(raw, path, value)
            mentions = None if reshapes else mentions_of(("method", entry["name"], key), value)
            entry[key] = value
            return raw, path, mentions
        kind = "value"
    if kind == "add":
        path = draw(st.sampled_from(OPTIONAL))
        parent = raw
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        if isinstance(parent, dict) and path[-1] not in parent:
            parent[path[-1]] = value = copy.deepcopy(draw(st.sampled_from(VALUES)))
            return raw, path, mentions_of(path, value)
        kind = "value"
    if kind == "rename_node":
        old = draw(st.sampled_from(sorted(raw["nodes"])))
        new = draw(st.sampled_from(["", "a.b", "pupil", "teacher", "stem", "1"]))
        raw["nodes"] = {new if k == old else k: v for k, v in raw["nodes"].items()}
        return raw, ("nodes", old), [old, repr(new), new] if new else [old, repr(new)]
    path = draw(st.sampled_from(candidates))
    parent, key = at(raw, path[:-1]), path[-1]
    if kind == "drop":
        parent.pop(key)
        # a dropped field shows where the recipe relies on it, which may be anywhere (a stage naming a dropped node)
        return raw, path, None
    if kind == "unknown":
        target = at(raw, path)
        if isinstance(target, dict):
            target["zz_unknown"] = 1
            return raw, (*path, "zz_unknown"), ["zz_unknown"]
        if isinstance(parent, dict):
            parent["zz_unknown"] = 1
            return raw, (*path[:-1], "zz_unknown"), ["zz_unknown"]
    value = copy.deepcopy(draw(st.sampled_from(VALUES)))
    # emptied (None, [], {}) is like dropped: what relied on the content may name its own place
    anywhere = value in (None, [], {}) or reshapes_the_graph(raw, path, value)
    parent[key] = value
    return raw, path, None if anywhere else mentions_of(path, value)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a width of 0
@FUZZ
@given(data=st.data())
def test_mutated_recipes_validate_or_stop_with_one_line_naming_the_place(bases, workdir, data) -> None:
    raw, path, mentions = data.draw(mutated(bases))
    message = run_cli(raw, [], workdir)
    if message is not None:
        assert_names_place(message, mentions)


@st.composite
def set_items(draw, bases: dict[str, dict]):
    """A base recipe and one --set item: a field's path (existing, one level too deep, or unknown) = YAML text,
    or a malformed item."""
    name = draw(st.sampled_from(sorted(bases)))
    raw = bases[name]
    kind = draw(st.sampled_from(["field", "field", "optional", "deeper", "unknown", "malformed"]))
    if kind == "malformed":
        item = draw(st.sampled_from(["a.b", "train.epochs", "=3", "=", ".=1", "..=1", " =1", "train..epochs=[",
                                     "train.epochs=[", "train.epochs={", "nodes.student=", "transfers.0.weight=2",
                                     "method.=kd", "zz.yy", "train.epochs==1", "train.=2", "nodes..student.arch=x"]))
        if item == "method.=kd":  # `method=kd`: another method, so another graph
            return raw, item, None
        keys = [k for k in item.split("=", 1)[0].split(".") if k.strip() and not k.isdigit()]
        return raw, item, [item, repr(item), *keys]
    keys = [".".join(map(str, p)) for p in paths(raw) if p and p[:2] != ("data", "options")]  # as above
    key = draw(st.sampled_from(keys))
    if kind == "optional":
        key = ".".join(draw(st.sampled_from(OPTIONAL)))
    elif kind == "deeper":
        key += ".zz_deeper"
    elif kind == "unknown":
        key = draw(st.sampled_from(["zz_top", "train.zz_optim", "nodes.student.zz", "method.zz_arg", "data.zz"]))
    text = draw(st.sampled_from(TEXTS))
    item = f"{key}={text}"
    try:
        reshapes = reshapes_the_graph(raw, [k for k in key.split(".") if k], yaml.safe_load(text))
    except yaml.YAMLError:
        reshapes = False
    return raw, item, None if reshapes else [item, repr(item), *[k for k in key.split(".") if k and not k.isdigit()]]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a width of 0
@FUZZ
@given(data=st.data())
def test_set_overrides_validate_or_stop_with_one_line_naming_the_item(bases, workdir, data) -> None:
    raw, item, mentions = data.draw(set_items(bases))
    message = run_cli(raw, [item], workdir)
    if message is not None:
        assert_names_place(message, mentions)


def test_every_base_recipe_is_valid(bases, workdir) -> None:
    """The fuzzer starts from valid recipes (else every mutation would only find the base's own fault)."""
    for name, raw in bases.items():
        assert run_cli(raw, [], workdir) is None, name


# What the fuzzer found, as plain cases: each was a traceback (or, where said, a line that named no place) before.
def edit(base: str, *changes: tuple[tuple, object]):
    """A base recipe with `path = value` changes (a path into the recipe's mappings and lists)."""
    def apply(bases: dict[str, dict]) -> dict:
        raw = copy.deepcopy(bases[base])
        for path, value in changes:
            parent = raw
            for key in path[:-1]:
                parent = parent.setdefault(key, {}) if isinstance(parent, dict) else parent[key]
            parent[path[-1]] = value
        return raw
    return apply


FOUND = [
    # methods/registry.py: a method argument of the wrong type (TypeError from the loss at the dry run, or from the
    # method: unhashable type), a value the method refuses (ValueError), a count that filled the memory
    pytest.param(edit("kd", (("method",), {"name": "kd", "temperature": "abc"})),
                 r"^method\.kd\.temperature: Input should be a valid number, got 'abc'$", id="method-arg-type"),
    pytest.param(edit("kd", (("method",), {"name": "kd", "teacher": ["pupil"]})),
                 r"^method\.kd\.teacher: Input should be a valid string", id="method-arg-node-list"),
    pytest.param(edit("dml", (("method", "peers"), ["student"])),
                 r"^method\.dml: dml needs at least two peers$", id="method-refuses"),
    pytest.param(edit("kd", (("method",), {"name": "slkd", "num_slts": 2**31})),
                 r"^method\.slkd: num_slts must be between 1 and 100, got 2147483648$", id="method-count"),
    # methods/registry.py: the recipe's own nodes, supervise or presets of the wrong type beside a method
    pytest.param(edit("kd", (("nodes", "teacher"), 5)),
                 r"^nodes\.teacher: expected a mapping of node fields, got int$", id="node-not-mapping"),
    pytest.param(edit("kd", (("nodes",), [None])), r"^nodes: expected a mapping, got list$", id="nodes-not-mapping"),
    pytest.param(edit("kd", (("supervise",), ["student"])),
                 r"^supervise: expected a mapping, got list$", id="supervise-not-mapping"),
    pytest.param(edit("dkd", (("presets", "dkd", "args"), True)),
                 r"^presets\.dkd\.args: expected a mapping, got bool$", id="preset-args-not-mapping"),
    pytest.param(edit("dkd", (("presets", "reviewkd", "zz"), 1)),  # one line, but it named no key
                 r"^presets\.reviewkd: .*unknown field 'zz'$", id="preset-unknown-key"),
    # flow/spec.py: a criterion's or a supervision loss's parameter of the wrong type (the latter failed only at the
    # first training step, after the run directory was written)
    pytest.param(edit("graph", (("transfers", 0, "temperature"), "abc")),
                 r"^transfers\.0: temperature: Input should be a valid number, got 'abc' \(criterion 'kd'\)$",
                 id="criterion-param-type"),
    pytest.param(edit("graph", (("supervise", "student"), {"loss": "tfkd_reg", "temperature": "x"})),
                 r"^supervise\.student: temperature: Input should be a valid number", id="loss-param-type"),
    # flow/spec.py: same_as not a name, a node name no tap can reach, seeds, devices and sizes beyond what torch takes
    pytest.param(edit("dml", (("nodes", "peer", "same_as"), ["teacher"])),
                 r"^nodes\.peer\.same_as: \['teacher'\] is not a node with its own arch$", id="same-as-list"),
    pytest.param(edit("graph", (("nodes", ""), {"arch": "mlp"})), r"^nodes: '' cannot name a node", id="node-name-empty"),
    pytest.param(edit("graph", (("nodes", "a.b"), {"arch": "mlp"})),  # one line, but one that blamed a tap
                 r"^nodes: 'a\.b' cannot name a node", id="node-name-dot"),
    pytest.param(edit("graph", (("seed",), 2**64)),
                 r"^seed: Input should be less than 18446744073709551616$", id="seed-beyond-torch"),
    pytest.param(edit("graph", (("device",), "abc")), r"^device: 'abc' is not a device", id="device-unknown"),
    pytest.param(edit("graph", (("data", "test_limit"), 1)),
                 r"^data\.test_limit: Input should be greater than or equal to 2$", id="test-limit-1"),
    pytest.param(edit("graph", (("data", "validation"), float("inf"))),
                 r"^data\.validation: size: inf is neither a fraction", id="validation-inf"),
    pytest.param(edit("graph", (("train", "views"), 2**63)),  # and it left a run directory
                 r"^train\.views: Input should be less than 9223372036854775808$", id="views-beyond-int64"),
    pytest.param(edit("graph", (("train", "threads"), 2**31)),
                 r"^train\.threads: Input should be less than 2147483648$", id="threads-beyond-int32"),
    # flow/graph.py: a model that does not take the data's inputs, a size torch refuses or cannot allocate, a
    # criterion parameter the loss cannot compute with
    pytest.param(edit("graph", (("data", "options", "shape"), [1, 4, 4])),
                 r"^nodes\.teacher: convnet_l cannot run on the data's inputs of shape \(1, 4, 4\): ",
                 id="input-too-small"),
    pytest.param(edit("graph", (("nodes", "student", "args"), {"width": -1})),
                 r"^nodes\.student\.args: Trying to create tensor with negative dimension -1", id="width-negative"),
    pytest.param(edit("graph", (("transfers", 0, "temperature"), 2**63)),
                 r"^transfers\.0: criterion 'kd' fails with its parameters \(temperature=9223372036854775808\): ",
                 id="criterion-param-int-overflow"),
    pytest.param(edit("crd", (("method",), {"name": "crd", "feat_dim": 0})),
                 r"^transfers\.0: criterion 'crd': float division by zero$", id="crd-feat-dim-0"),
]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make, pattern", FOUND)
def test_what_the_fuzzer_found_is_one_line_naming_the_place(bases, workdir, make, pattern) -> None:
    message = run_cli(make(bases), [], workdir)
    assert message is not None and re.search(pattern, message), message


def test_what_the_fuzzer_found_valid_stays_valid(bases, workdir) -> None:
    """A seed up to 2**64 (torch's range) was an overflow when node seeds (seed·1000 + index) passed it."""
    assert run_cli(edit("graph", (("seed",), 2**63))(bases), [], workdir) is None
    assert run_cli(edit("graph", (("seed",), -1))(bases), [], workdir) is None
