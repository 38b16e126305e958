"""The spec's one source: every key's help text lives in scoretrain/run/config.py, and
docs/spec.md's reference is generated from it (tools/spec_doc.py), so the two cannot drift."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from scoretrain.errors import ConfigError
from scoretrain.run import config

ROOT = Path(__file__).resolve().parent.parent


def spec_doc():
    spec = importlib.util.spec_from_file_location("spec_doc", ROOT / "tools" / "spec_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_in_docs_spec_md_is_generated_from_config():
    tool = spec_doc()
    _, body, _ = tool.split(tool.PAGE.read_text())
    assert body == tool.generated(), "docs/spec.md's spec reference is out of date: run `python tools/spec_doc.py`"


def test_every_section_and_every_key_is_described():
    for prefix, cls in config.sections():
        doc = (cls.__doc__ or "").strip()
        assert doc and not doc.startswith(cls.__name__ + "("), f"{cls.__name__}: no docstring (the section's description)"
        assert "\n" not in doc, f"{cls.__name__}: the section's description is one line"
    described = {f.name for _, cls in config.sections() for f in config.section_keys(cls)}
    for prefix, cls in config.sections():
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                continue  # a section, described by its docstring
            assert f.name in described and f.metadata["help"].strip(), f"{prefix}{f.name}: no help text (give it one with key())"
    assert [p for p, _ in config.sections()] == ["", "data.", "model.", "train."]


def test_every_documented_choice_is_what_validation_accepts():
    for prefix, cls in config.sections():
        for f in config.section_keys(cls):
            choices = f.metadata["choices"]
            if not choices:
                continue
            with pytest.raises(ConfigError) as e:
                config.load(None, [f"{prefix}{f.name}=no-such-value"])
            expected = f"{prefix}{f.name}: expected one of {', '.join(choices)}"
            # model.arch also takes the depths of the resnet and wrn families, and says so
            assert str(e.value).startswith(expected) and str(e.value).endswith("got 'no-such-value'"), str(e.value)


def test_show_prints_the_resolved_spec_that_loads_back():
    cfg = config.load(ROOT / "configs" / "mnist_fc.yaml", ["model.k=0.3", "train.epochs=5"])
    text = config.show(cfg)
    assert "k: 0.3" in text and "epochs: 5" in text and "eval_batch_size: 1000" in text  # defaults filled in
    assert config.from_text(text, "shown") == cfg
    assert config.show(config.Config()) == config.dump(config.Config())  # what a run writes as config.yaml
